"""bench extract: every figure present, consistent with the others, on tiny PNGs made here."""

import json

import numpy as np
import pytest
import tensorflow as tf

from cxr14.config import BackboneConfig
from cxr14.errors import InputError
from extract.backbones import load_backbone
from extract.bench import bench_extract

KEYS = {
    "decode_images_per_s",
    "backbone_images_per_s",
    "pipeline_images_per_s",
    "ratio",
    "peak_memory_mb",
    "images",
    "batch_size",
    "backbone",
    "device",
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
def backbone():
    cfg = BackboneConfig(name="tiny", source="random", image_size=32, preprocess="unit", width=8, grid=2)
    return load_backbone(cfg)


def test_bench_reports_every_figure(pngs, backbone):
    result = bench_extract(backbone=backbone, paths=pngs, batch_size=8, images=16, repeats=2)
    assert KEYS <= set(result)
    json.dumps(result)  # printed with --json
    assert result["images"] == 16 and result["decoded"] == 15 and result["batch_size"] == 8
    assert result["repeats"] == 2
    assert result["backbone"] == "tiny" and result["device"].startswith(("CPU", "GPU"))
    for key in ("decode_images_per_s", "backbone_images_per_s", "pipeline_images_per_s", "peak_memory_mb"):
        assert result[key] > 0, key
    assert result["decode_images_per_s"] == pytest.approx(15 / result["decode_s"])
    expected_ratio = result["pipeline_s"] / (result["decode_s"] + result["backbone_s"])
    assert result["ratio"] == pytest.approx(expected_ratio)
    assert result["decode_cpu_ms_per_image"] > 0 and result["cpu_ratio"] > 0


def test_bench_refuses_nothing_to_decode(tmp_path, backbone):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="none of the 1 images could be decoded"):
        bench_extract(backbone=backbone, paths=[str(tmp_path / "bad.png")], batch_size=4, images=4)
    with pytest.raises(InputError, match="needs images"):
        bench_extract(backbone=backbone, paths=[], batch_size=4, images=4)
