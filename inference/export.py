"""Export a trained run as one SavedModel: PNG bytes (or a decoded gray image) in, 14 calibrated
probabilities and calls out.

The exported graph traces extraction's own decode/preprocess, the backbone(s), the cache's rounding, the
head, and as its last step the run's calibration and thresholds (fitted on validation), so it gives
predict's numbers without this repository: `tf.saved_model.load(DIR)` is enough.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf

from cxr14.errors import InputError
from cxr14.outputs import check_output_folder
from cxr14.temps import remove_stale_temps, temp_path
from dataset.image_loader import decode, load_image, to_pixels
from inference.trained import TrainedRun, decided, fused_probabilities, load_run
from results.operating import NO_CALL, threshold_array

# Largest |exported - predict| accepted when the export checks itself after saving.
TOLERANCE = 1e-5
USAGE = """\
import tensorflow as tf
model = tf.saved_model.load(DIR)
png = tf.io.read_file("image.png")
out = model.predict_png(tf.stack([png]))
probabilities = out["probabilities"]   # (1, 14) calibrated; out["uncalibrated"]: the head's own
calls = out["calls"]                   # (1, 14) int32: 1 positive, 0 negative, -1 no operating point
labels = [s.decode() for s in model.labels.numpy()]
# Signatures for TF Serving / keras.layers.TFSMLayer: serving_default (png: string[b]) and
# serve_image (image: float32[b, H, W, 1], gray in [0, 1]); both return that dict.
# DICOM films: decode them as training did, in Python with the cxr14 repository and pydicom, then
# image = dataset.image_loader.read_gray01("film.dcm"); model.predict_image(image[None])
"""


def export_run(*, run_dir: Path, out_dir: Path) -> Path:
    """Write run_dir's backbone(s) + head as one SavedModel in out_dir (new or empty); returns out_dir.
    Everything comes from the run folder."""
    out_dir = Path(out_dir)
    _check_target(out_dir)
    run = load_run(run_dir)
    module = build_module(run)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # left by killed exports to the same folder
    tmp = temp_path(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_module(module, tmp, run=run)
        check_export(tmp, run=run)
        _check_target(out_dir)  # nothing may have appeared there while we worked
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_target(out_dir: Path) -> None:
    check_output_folder(out_dir, what="--out")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} exists and is not an empty folder; pick a new --out or remove it first")


def build_module(run: TrainedRun) -> tf.Module:
    """A tf.Module with predict_png (string[b]) and predict_image (float32[b,H,W,1] in [0,1]), labels and
    thresholds."""
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="png")])
    def predict_png(png):
        return _outputs(run, _preprocessed(run, png, to_gray01=decode))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="image")])
    def predict_image(image):
        return _outputs(run, _preprocessed(run, image, to_gray01=tf.identity))

    module.predict_png = predict_png
    module.predict_image = predict_image
    module.labels = tf.Variable(list(run.labels), trainable=False, name="labels")
    thresholds = threshold_array(run.decisions["thresholds"], label_names=run.labels)
    module.thresholds = tf.Variable(thresholds, trainable=False, name="thresholds")  # NaN: no operating point
    # The backbone and head variables are captured by the traced functions, not attributes of the module;
    # saving needs them tracked, and listing them here avoids saving Keras' own object graph.
    captured = {}
    for fn in (predict_png, predict_image):
        for var in fn.get_concrete_function().variables:
            captured.setdefault(var.ref(), var)
    module.captured_variables = list(captured.values())
    return module


def _outputs(run: TrainedRun, images: dict) -> dict:
    """The head's probabilities, then the run's calibration and calls as the graph's last step."""
    raw = fused_probabilities(run, images)
    calibrated, calls = decided(run, raw)
    return {"probabilities": calibrated, "uncalibrated": raw, "calls": calls}


def _preprocessed(run: TrainedRun, batch: tf.Tensor, *, to_gray01) -> dict:
    """Per image: to gray [0,1] once, then each backbone's own pixels; {name: (b, s, s, 1) uint8}."""
    specs = [backbone.spec for backbone in run.backbones.values()]
    signature = tuple(tf.TensorSpec((s.size, s.size, 1), tf.uint8) for s in specs)

    def one(item):
        image01 = to_gray01(item)
        return tuple(to_pixels(image01, spec.size) for spec in specs)

    images = tf.map_fn(one, batch, fn_output_signature=signature)
    return dict(zip(run.backbones, images, strict=True))


def save_module(module: tf.Module, path: Path, *, run: TrainedRun) -> None:
    """The SavedModel plus labels.json and model.json (what it is, where it came from, how to call it)."""
    signatures = {
        "serving_default": module.predict_png.get_concrete_function(),
        "serve_image": module.predict_image.get_concrete_function(),
    }
    tf.saved_model.save(module, str(path), signatures=signatures)
    (path / "labels.json").write_text(json.dumps(list(run.labels), indent=2) + "\n", encoding="utf-8")
    about = {
        "run": str(run.run_dir),
        "warning": run.warning or None,
        "notice": run.notice or None,
        "labels": list(run.labels),
        "backbones": {name: b.config for name, b in run.backbones.items()},
        "feature_dtypes": run.dtypes,
        "inputs": {
            "serving_default": "png: string[b], PNG file bytes (8/16-bit, gray/RGB/RGBA/palette)",
            "serve_image": "image: float32[b, H, W, 1], decoded gray in [0, 1]",
        },
        "outputs": {
            "probabilities": "float32[b, L], calibrated (see `calibration`), columns in `labels` order",
            "uncalibrated": "float32[b, L], the head's sigmoid outputs",
            "calls": f"int32[b, L], 1 when probabilities >= `thresholds`, 0 below, {NO_CALL} without a threshold",
        },
        "calibration": run.decisions["calibration"],
        "thresholds": run.decisions["thresholds"],
        "usage": USAGE,
    }
    (path / "model.json").write_text(
        json.dumps(about, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def check_export(path: Path, *, run: TrainedRun) -> float:
    """Reload the SavedModel and compare it with predict's path on a synthetic image; returns the gap."""
    png = _synthetic_png(size=max(b.spec.size for b in run.backbones.values()) + 7)
    image_path = path / "check.png"
    image_path.write_bytes(png)
    try:
        images = {name: load_image(image_path, b.spec)[None] for name, b in run.backbones.items()}
    finally:
        image_path.unlink()
    expected, _ = decided(run, fused_probabilities(run, images))
    loaded = tf.saved_model.load(str(path))
    got = loaded.signatures["serving_default"](png=tf.constant([png]))["probabilities"].numpy()
    gap = float(np.abs(got - expected.numpy()).max())
    if not gap <= TOLERANCE:
        raise RuntimeError(f"exported model differs from predict by {gap:.2e} (> {TOLERANCE}); not written")
    return gap


def _synthetic_png(*, size: int) -> bytes:
    """A deterministic gray test image with structure at several scales."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = 0.5 + 0.3 * np.sin(9 * x) * np.cos(5 * y) + 0.2 * np.random.default_rng(0).random((size, size))
    gray = np.clip(image * 255, 0, 255).astype(np.uint8)[..., None]
    return tf.io.encode_png(gray).numpy()
