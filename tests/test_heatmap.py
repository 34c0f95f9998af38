"""inference/heatmap.py and predict --heatmap: Grad-CAM or SmoothGrad maps in the image's own geometry."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import run
from cxr14.caveats import SYNTHETIC_NOTICE
from cxr14.errors import InputError
from dataset.image_loader import normalize, read_gray01, to_pixels
from dataset.settings import LABELS
from extract.settings import BackboneConfig
from inference.heatmap import Explanation, _gradcam, explain, heatmap_method, logit_run, overlay_figure, peak
from inference.trained import head_probabilities, load_run
from tests.fixtures import PIXELS, TINY, make_run, write_dicom, write_png

# Grid 1 is global average pooling, as keras.applications backbones pool.
GLOBAL = BackboneConfig(
    name="gap", source="random", image_size=32, preprocess="unit", seed=3, width=8, grid=1
)


def test_method_follows_what_the_backbones_expose(tmp_path):
    offline = load_run(make_run(tmp_path / "fc", [TINY]))
    pixels = load_run(make_run(tmp_path / "cnn", [PIXELS]))
    assert heatmap_method(offline) == "gradcam" and heatmap_method(offline, "smoothgrad") == "smoothgrad"
    assert heatmap_method(pixels) == "smoothgrad"
    with pytest.raises(InputError, match="pix exposes none"):
        heatmap_method(pixels, "gradcam")
    with pytest.raises(InputError, match="auto, gradcam, smoothgrad"):
        heatmap_method(offline, "occlusion")


def test_gradcam_is_classic_gradcam_on_a_globally_pooled_backbone(tmp_path):
    """Through global average pooling the gradient is the same at every place, so the element-wise
    form equals Grad-CAM's channel weights (the mean gradient) times the map."""
    trained = logit_run(load_run(make_run(tmp_path / "fc", [GLOBAL], dtype="float32")))
    backbone = trained.backbones["gap"]
    gray01 = read_gray01(write_png(tmp_path / "a.png", size=48, seed=3))
    pixels = tf.cast(to_pixels(tf.constant(gray01), backbone.spec.size), tf.float32)[None]
    image = normalize(pixels, backbone.spec)
    label = 4
    with tf.GradientTape() as tape:
        maps = backbone.feature_map(image)
        tape.watch(maps)
        logit = head_probabilities(trained, {"gap": backbone.pool(maps)})[0, label]
    weights = tf.reduce_mean(tape.gradient(logit, maps), axis=[1, 2], keepdims=True)
    classic = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[0].numpy()
    ours = _gradcam(trained, gray01, indices=[label])[0][0]
    assert classic.max() > 0
    np.testing.assert_allclose(ours, classic, rtol=1e-4, atol=1e-6 * classic.max())


def test_maps_are_in_the_image_geometry_and_peak_at_one(tmp_path):
    trained = load_run(make_run(tmp_path / "fc", [TINY]))
    gray01 = read_gray01(write_png(tmp_path / "wide.png", size=40, seed=1))
    wide = np.concatenate([gray01, gray01[:, :20]], axis=1)  # 40 x 60: not the backbone's square
    for method in ("gradcam", "smoothgrad"):
        explanation = explain(trained, wide, labels=["Mass", "Edema"], method=method, seed=0)
        assert explanation.method == method and explanation.labels == ("Mass", "Edema")
        assert explanation.maps.shape == (2, 40, 60) and explanation.maps.dtype == np.float32
        assert np.allclose(explanation.maps.max(axis=(1, 2)), 1.0) and explanation.maps.min() >= 0
        x, y = peak(explanation.maps[0])
        assert 0 < x < 60 and 0 < y < 40
    # SmoothGrad's noise is drawn from the seed: the same seed, the same map.
    first, second = (explain(trained, wide, labels=["Mass"], method="smoothgrad", seed=7) for _ in range(2))
    np.testing.assert_array_equal(first.maps, second.maps)


def test_predict_heatmap_writes_overlays_for_png_and_dicom(tmp_path, capsys):
    run_dir = make_run(tmp_path / "runs" / "fc", [TINY])
    films = tmp_path / "films"
    films.mkdir()
    png = write_png(films / "a.png", size=40, seed=2)
    pixels = (np.random.default_rng(0).random((60, 52)) * 4095).astype(np.uint16)
    dicom = write_dicom(
        films / "a.dcm", pixels, BitsStored=12, HighBit=11, PhotometricInterpretation="MONOCHROME1"
    )
    broken = films / "b.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "heatmaps"
    argv = [
        "predict",
        "--run",
        str(run_dir),
        str(films),
        "--heatmap",
        str(out),
        "--heatmap-top",
        "2",
        "--json",
    ]
    assert run.main(argv) == 0
    results = {r["image"]: r for r in json.loads(capsys.readouterr().out)}
    assert results[str(broken)]["error"] and "heatmap" not in results[str(broken)]
    # Sorted, a.dcm comes before a.png, and so it keeps the plain stem.
    for path, stem, shape in ((dicom, "a", (60, 52)), (png, "a~2", (40, 40))):
        result = results[str(path)]
        top = sorted(result["probabilities"], key=lambda label: -result["probabilities"][label])[:2]
        assert result["heatmap"] == str(out / f"{stem}.heatmap.png")
        assert list(result["heatmap_maps"]) == top
        overlay = tf.io.decode_png((out / f"{stem}.heatmap.png").read_bytes())
        assert overlay.shape[1] > overlay.shape[0] > 50  # the film and two panels side by side
        heading = Image.open(out / f"{stem}.heatmap.png").text["Title"]
        assert heading.startswith("not a medical model: random-weight backbone(s) tiny / ")
        for label in top:
            heatmap = np.load(out / f"{stem}.{label}.npy")
            assert heatmap.shape == shape and heatmap.dtype == np.float16 and heatmap.max() == 1.0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.heatmap.png" for s in ("a", "a~2")]
        + [
            f"{s}.{label}.npy"
            for s in ("a", "a~2")
            for label in results[str(dicom if s == "a" else png)]["heatmap_maps"]
        ]
    )


def test_pixels_run_heatmaps_by_smoothgrad_and_gradcam_is_refused_before_work(tmp_path, capsys):
    run_dir = make_run(tmp_path / "runs" / "cnn", [PIXELS])
    png = write_png(tmp_path / "a.png", size=36, seed=4)
    out = tmp_path / "maps"
    assert run.main(["predict", "--run", str(run_dir), str(png), "--heatmap", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert len(result["heatmap_maps"]) == 3 and set(result["heatmap_maps"]) <= set(LABELS)
    assert (
        run.main(
            [
                "predict",
                "--run",
                str(run_dir),
                str(png),
                "--heatmap",
                str(tmp_path / "no"),
                "--heatmap-method",
                "gradcam",
            ]
        )
        == 2
    )
    assert "exposes none" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_overlays_carry_the_caveat_first_and_a_colour_bar(tmp_path):
    gray01 = np.random.default_rng(0).random((40, 30, 1)).astype(np.float32)
    maps = np.random.default_rng(1).random((2, 40, 30)).astype(np.float32)
    explanation = Explanation(method="gradcam", labels=("Cardiomegaly", "Emphysema"), maps=maps)
    caveat = [SYNTHETIC_NOTICE, "not a medical model: random-weight backbone(s) tiny"]
    figure = overlay_figure(
        gray01=gray01, explanation=explanation, probabilities=[0.99976, 0.4], title="a.png", caveat=caveat
    )
    lines = figure.get_suptitle().splitlines()
    assert lines[:2] == caveat and lines[2].startswith("gradcam: where each finding's")
    panels = [ax.get_title() for ax in figure.axes[:3]]
    # A sure finding reads 0.99976, not 1.00; the others keep two places.
    assert panels == ["a.png", "Cardiomegaly 0.99976", "Emphysema 0.40"]
    (bar,) = figure.axes[3:]
    assert bar.get_ylabel() == "share of the map's peak" and bar.get_ylim() == (0.0, 1.0)
    plain = overlay_figure(gray01=gray01, explanation=explanation, probabilities=[0.5, 0.4], title="a.png")
    assert plain.get_suptitle().startswith("gradcam: where")
