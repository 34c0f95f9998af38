"""inference/export.py: one SavedModel, image in, probabilities out, equal to predict without this repository."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from cxr14.errors import InputError
from dataset.image_loader import decode
from dataset.settings import LABELS
from extract.settings import BackboneConfig
from inference.export import export_run
from inference.predict import predict_images
from tests.fixtures import PIXELS, REAL_CXR, TINY, TINY_STD, add_decisions, make_config, make_run, write_png

# Runs in a fresh interpreter, from a folder outside the repository, with only TensorFlow imported.
RELOAD = """
import json, sys
import tensorflow as tf
try:
    import extract  # noqa: F401
    sys.exit("the repository is importable: the test would not prove the export is self-contained")
except ImportError:
    pass
model = tf.saved_model.load(sys.argv[1])
pngs = tf.constant([open(p, "rb").read() for p in sys.argv[2:]])
out = model.signatures["serving_default"](png=pngs)
labels = [s.decode() for s in model.labels.numpy()]
print(json.dumps({
    "labels": labels,
    "probabilities": out["probabilities"].numpy().tolist(),
    "calls": out["calls"].numpy().tolist(),
    "thresholds": [None if t != t else float(t) for t in model.thresholds.numpy()],
}))
"""


def _probs(results: list[dict]) -> np.ndarray:
    return np.array([[r["probabilities"][label] for label in LABELS] for r in results])


@pytest.fixture
def images(tmp_path) -> list[Path]:
    real = sorted(REAL_CXR.glob("*.png")) if REAL_CXR.is_dir() else []
    made = [write_png(tmp_path / "a.png", seed=3), write_png(tmp_path / "b.png", seed=4, bits=16, size=70)]
    return real + made


def _calls(results: list[dict]) -> np.ndarray:
    codes = {"positive": 1, "negative": 0, None: -1}
    return np.array([[codes[r["calls"][label]] for label in LABELS] for r in results])


def test_round_trip_in_a_fresh_process_matches_predict(tmp_path, images):
    run_dir = make_run(tmp_path / "runs" / "fc", [TINY])
    decisions = add_decisions(run_dir, method="platt")
    config = make_config(tmp_path)
    out = export_run(run_dir=run_dir, out_dir=tmp_path / "export" / "model")
    predicted = predict_images(run_dir=run_dir, inputs=images, extract=config.extract)
    expected = _probs(predicted)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), *map(str, images)],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reloaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert reloaded["labels"] == list(LABELS)
    got = np.array(reloaded["probabilities"])
    assert got.shape == (len(images), len(LABELS))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)  # calibrated, as predict prints them
    assert np.ptp(got, axis=0).max() > 1e-3  # different images, different answers
    np.testing.assert_array_equal(np.array(reloaded["calls"]), _calls(predicted))
    assert (
        reloaded["thresholds"][LABELS.index("Edema")]
        == decisions["thresholds"]["labels"]["Edema"]["threshold"]
    )

    assert json.loads((out / "labels.json").read_text()) == list(LABELS)
    about = json.loads((out / "model.json").read_text())
    assert set(about["inputs"]) == {"serving_default", "serve_image"}
    assert about["feature_dtypes"] == {"tiny": "float16"}
    assert about["calibration"] == decisions["calibration"] and about["thresholds"] == decisions["thresholds"]
    assert about["warning"].startswith("not a medical model") and about["notice"] is None


def test_ensemble_and_pixels_export_both_signatures(tmp_path, images):
    config = make_config(tmp_path)
    for name, backbones in (("ensemble", [TINY, TINY_STD]), ("cnn", [PIXELS])):
        run_dir = make_run(tmp_path / "runs" / name, backbones)
        if name == "ensemble":
            add_decisions(run_dir, method="isotonic")
        out = export_run(run_dir=run_dir, out_dir=tmp_path / "export" / name)
        expected = _probs(predict_images(run_dir=run_dir, inputs=images, extract=config.extract))
        model = tf.saved_model.load(str(out))
        pngs = tf.constant([p.read_bytes() for p in images])
        np.testing.assert_allclose(
            model.predict_png(pngs)["probabilities"].numpy(), expected, atol=1e-5, rtol=0
        )
        for path, row in zip(images, expected, strict=True):
            gray = decode(tf.io.read_file(str(path)))[None]
            got = model.signatures["serve_image"](image=gray)["probabilities"].numpy()[0]
            np.testing.assert_allclose(got, row, atol=1e-5, rtol=0)


def test_refuses_to_overwrite_and_leaves_no_temporary_folder(tmp_path):
    run_dir = make_run(tmp_path / "runs" / "fc", [TINY])
    make_config(tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an empty folder"):
        export_run(run_dir=run_dir, out_dir=taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_run(run_dir=run_dir, out_dir=empty) == empty
    assert (empty / "saved_model.pb").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "runs", "taken"]


def test_metadata_run_is_refused(tmp_path):
    run_dir = make_run(tmp_path / "meta", [TINY], metadata=True)
    with pytest.raises(InputError, match="metadata"):
        export_run(run_dir=run_dir, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _hub_style_saved_model(path: Path) -> Path:
    """A SavedModel with variables, callable at its root, as TF Hub image models are."""
    module = tf.Module()
    module.kernel = tf.Variable(np.random.default_rng(5).normal(size=(3, 3, 3, 6)).astype(np.float32))
    module.__call__ = tf.function(
        lambda images: tf.reduce_mean(
            tf.nn.relu(tf.nn.conv2d(images, module.kernel, 2, "SAME")), axis=[1, 2]
        ),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
    )
    tf.saved_model.save(module, str(path))
    return path


def test_backbones_with_variables_survive_export(tmp_path, images):
    hub = BackboneConfig(
        name="hubby",
        source="hub",
        handle=str(_hub_style_saved_model(tmp_path / "hub")),
        image_size=16,
        preprocess="unit",
    )
    app = BackboneConfig(
        name="mobile", source="keras", model="MobileNetV2", weights="none", image_size=32, preprocess="keras"
    )
    config = make_config(tmp_path)
    run_dir = make_run(tmp_path / "runs" / "ensemble", [hub, app])
    expected = _probs(predict_images(run_dir=run_dir, inputs=images, extract=config.extract))
    model = tf.saved_model.load(str(export_run(run_dir=run_dir, out_dir=tmp_path / "export")))
    got = model.predict_png(tf.constant([p.read_bytes() for p in images]))["probabilities"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.ptp(got, axis=0).max() > 1e-3
