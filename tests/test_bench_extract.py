"""bench extract: every figure present, consistent with the others, on tiny PNGs made here."""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from bench.extract import bench_extract
from cxr14.errors import InputError
from extract.backbones import load_backbone
from extract.extraction import extract_features
from extract.inputs import PixelInput, PngInput
from extract.settings import BackboneConfig

KEYS = {
    "backbones",
    "device",
    "cores",
    "images",
    "decoded",
    "batch_size",
    "decode_images_per_s_per_core",
    "decode_images_per_s",
    "backbone_images_per_s",
    "pipeline_images_per_s",
    "ratio",
    "full_set_minutes",
    "projection",
    "peak_memory_mb",
}


@pytest.fixture
def pngs(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(20):
        pixels = rng.integers(0, 256, (48, 48, 1), dtype=np.uint8)
        path = tmp_path / f"{i:02d}.png"
        path.write_bytes(tf.io.encode_png(pixels).numpy())
        paths.append(str(path))
    (tmp_path / "05.png").write_bytes(b"")  # one failure: timed passes must agree on what was decoded
    return paths


@pytest.fixture
def backbones():
    return [
        load_backbone(
            BackboneConfig(name="tiny", source="random", image_size=32, preprocess="unit", width=8, grid=2)
        ),
        load_backbone(
            BackboneConfig(
                name="wide", source="random", image_size=24, preprocess="standardize", width=4, grid=1
            )
        ),
    ]


def test_bench_reports_every_figure_for_a_one_pass(pngs, backbones):
    result = bench_extract(backbones=backbones, paths=pngs[:16], batch_size=8, repeats=2)
    assert KEYS <= set(result)
    json.dumps(result)  # printed with --json
    assert result["images"] == 16 and result["decoded"] == 15 and result["batch_size"] == 8
    assert result["repeats"] == 2 and result["backbones"] == ["tiny", "wide"]
    assert result["device"].startswith(("CPU", "GPU")) and result["cores"] >= 1
    assert set(result["backbone_images_per_s"]) == {"tiny", "wide"}
    for key in (
        "decode_images_per_s_per_core",
        "decode_images_per_s",
        "pipeline_images_per_s",
        "peak_memory_mb",
    ):
        assert result[key] > 0, key
    assert result["decode_images_per_s"] == pytest.approx(15 / result["decode_s"])
    expected_ratio = result["pipeline_s"] / (result["decode_s"] + sum(result["backbone_s"].values()))
    assert result["ratio"] == pytest.approx(expected_ratio)  # decoding counted once, every backbone added
    assert result["full_set_minutes"] == pytest.approx(112_120 / result["pipeline_images_per_s"] / 60)
    assert result["projection"] == (
        f"full ChestX-ray14 on this machine: {result['full_set_minutes']:.1f} min for backbones [tiny, wide] in one pass"
    )
    assert result["decode_cpu_ms_per_image"] > 0 and result["cpu_ratio"] > 0
    assert "pixels_speedup" not in result


def test_bench_times_the_pass_from_a_pixel_cache(pngs, backbones, tmp_path):
    names = [Path(p).name for p in pngs[:16]]
    pixels = load_backbone(BackboneConfig(name="pix", source="pixels", image_size=40, preprocess="bytes"))
    made = extract_features(
        backbones=[pixels],
        names=names,
        images=PngInput(pngs[:16]),
        cache_dir=tmp_path / "cache",
        batch_size=8,
        shard_size=8,
        progress=False,
    )[0]
    stored = PixelInput.open(made.path, names=names)
    result = bench_extract(backbones=backbones, paths=pngs[:16], batch_size=8, pixels=stored, repeats=1)
    assert result["from_pixels"] == "pix" and result["pixels_image_size"] == 40
    assert result["pixels_read_images_per_s"] > 0 and result["pixels_pipeline_images_per_s"] > 0
    assert result["pixels_speedup"] == pytest.approx(
        result["pixels_pipeline_images_per_s"] / result["pipeline_images_per_s"]
    )
    assert result["pixels_projection"].endswith("in one pass from pixel cache pix")
    # 48 -> 40 -> 32 px against 48 -> 32 px, on white noise (the worst case for resampling): not equal.
    gap = result["pixels_vs_png"]
    assert gap["images"] == 15 and set(gap["gray_levels_mean_abs"]) == {24, 32}
    assert 0 < gap["gray_levels_mean_abs"][32] <= gap["gray_levels_max_abs"][32] < 255
    assert set(gap["feature_relative_l2_median"]) == {"tiny", "wide"}
    assert 0 < gap["feature_relative_l2_median"]["tiny"] <= gap["feature_relative_l2_max"]["tiny"] < 1


def test_bench_refuses_nothing_to_decode(tmp_path, backbones):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="none of the 1 images could be decoded"):
        bench_extract(backbones=backbones, paths=[str(tmp_path / "bad.png")], batch_size=4)
    with pytest.raises(InputError, match="needs images"):
        bench_extract(backbones=backbones, paths=[], batch_size=4)
