"""Prediction on new PNG or DICOM images with a trained run: backbone(s) and head, through extraction's own
pipeline, then the run's calibration and a positive/negative call per label at its operating points;
optionally with heatmaps (heads/heatmap.py)."""

import csv
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cxr14.caveats import SYNTHETIC_NOTICE, not_medical_warning, random_weight_backbones
from cxr14.config import BackboneConfig, Config
from cxr14.errors import InputError
from cxr14.text import count
from extract.backbones import load_backbone
from extract.pipeline import ImageError, load_image
from heads.calibration import calibrator
from heads.operating import call_names, caller
from heads.run_folder import load_model, read_config, read_decisions

FORMATS = ("table", "json")
IMAGE_SUFFIXES = (".png", ".dcm")
CACHED_DTYPES = ("float16", "float32", "uint8")


@dataclass(frozen=True)
class TrainedRun:
    """What turns preprocessed images into probabilities and calls: backbones in model input order,
    dtypes, head, and the calibration and thresholds fitted on validation (identity and no calls for a run
    made before them)."""

    run_dir: Path
    labels: tuple[str, ...]
    backbones: dict  # name -> extract.backbones.Backbone
    dtypes: dict  # name -> dtype the cache stored its outputs in
    head: keras.Model
    decisions: dict  # {"calibration": dict | None, "thresholds": dict | None} as stored in the run
    calibrate: Callable  # (b, L) probabilities -> calibrated (b, L), TensorFlow ops
    call: Callable  # (b, L) calibrated -> (b, L) int32: 1 positive, 0 negative, -1 no threshold
    warning: str  # "" or the one-line not-a-medical-model warning
    notice: str  # "" or the synthetic-sample notice


def _synthetic(plan: dict) -> bool:
    return bool(plan.get("data", {}).get("synthetic"))


def run_warning(run_dir: Path) -> str:
    """The not-a-medical-model line for a run trained on synthetic data or random-weight backbones, or ""."""
    plan = read_config(run_dir)
    return not_medical_warning(
        synthetic=_synthetic(plan), random_backbones=random_weight_backbones(plan.get("backbones", {}))
    )


def load_run(run_dir: Path) -> TrainedRun:
    """Rebuild a run's backbones from config.json and load its head from model.keras."""
    run_dir = Path(run_dir)
    plan = read_config(run_dir)
    if plan["train"].get("metadata"):
        raise InputError(
            f"{run_dir} was trained with metadata (age, sex, view position concatenated to the features); "
            "new images come without them, so it cannot predict. Train a run without --metadata to predict."
        )
    head = load_model(run_dir)
    names = [t.name for t in head.inputs]
    if sorted(names) != sorted(plan["backbones"]):
        raise InputError(
            f"{run_dir / 'model.keras'} takes inputs {names} but {run_dir / 'config.json'} lists backbones "
            f"{list(plan['backbones'])}; the run folder is inconsistent, train it again"
        )
    dtypes = plan["feature_dtypes"]
    for name in names:
        if dtypes.get(name) not in CACHED_DTYPES:
            raise InputError(
                f"{run_dir / 'config.json'}: feature_dtypes[{name!r}] = {dtypes.get(name)!r}, "
                f"expected one of {', '.join(CACHED_DTYPES)}"
            )
    backbones = {
        name: load_backbone(_backbone_config(run_dir, name, plan["backbones"][name])) for name in names
    }
    _check_shapes(run_dir, head=head, backbones=backbones)
    labels = tuple(plan["labels"])
    decisions = read_decisions(run_dir)
    return TrainedRun(
        run_dir=run_dir,
        labels=labels,
        backbones=backbones,
        dtypes={name: dtypes[name] for name in names},
        head=head,
        decisions=decisions,
        calibrate=calibrator(decisions["calibration"], label_names=labels),
        call=caller(decisions["thresholds"], label_names=labels),
        warning=run_warning(run_dir),
        notice=SYNTHETIC_NOTICE if _synthetic(plan) else "",
    )


def _backbone_config(run_dir: Path, name: str, settings: dict | None) -> BackboneConfig:
    """The backbone `name` as the run's cache was extracted with it; a run on features of one's own has
    no image pipeline to run."""
    if settings is None:
        raise InputError(
            f"{run_dir} was trained on features of your own for backbone {name!r} (its cache records no "
            "backbone settings), so there is no image pipeline to run on new images; predict and export "
            "need backbones extracted with run.py extract"
        )
    fields = {f.name for f in dataclasses.fields(BackboneConfig)}
    try:
        return BackboneConfig(**{key: value for key, value in settings.items() if key in fields})
    except (TypeError, InputError) as err:
        raise InputError(
            f"{run_dir / 'config.json'}: backbones[{name!r}] is not a backbone's settings ({err}); "
            "train the run again"
        ) from None


def _check_shapes(run_dir: Path, *, head: keras.Model, backbones: dict) -> None:
    """Refuse a head whose inputs do not take its backbones' outputs (config.json and model.keras from
    different runs): Keras would fail deep inside the first call."""
    for tensor in head.inputs:
        backbone = backbones[tensor.name]
        gives = (backbone.dim,) if backbone.kind == "features" else (backbone.dim, backbone.dim)
        takes = tuple(tensor.shape[1:])
        if takes != gives:
            raise InputError(
                f"{run_dir / 'model.keras'} takes inputs of shape {takes} for backbone {tensor.name!r}, "
                f"but that backbone gives {gives}; the run folder is inconsistent, train it again"
            )


def as_cached(outputs: tf.Tensor, dtype: str) -> tf.Tensor:
    """Backbone outputs rounded exactly as the feature cache stored them, as float32 for the head."""
    # The head was trained on stored values; float16 rounding alone moves features by up to ~1e-3.
    if dtype == "uint8":  # tf.round, like extraction's np.rint, rounds halves to even
        return tf.clip_by_value(tf.round(tf.cast(outputs, tf.float32)), 0.0, 255.0)
    if dtype == "float16":
        return tf.cast(tf.cast(outputs, tf.float16), tf.float32)
    return tf.cast(outputs, tf.float32)


def cached_features(run: TrainedRun, images: dict) -> dict:
    """uint8 pixels per backbone {name: (b, s, s, 1)} -> features as the cache holds them."""
    return {
        name: as_cached(backbone.fn(tf.convert_to_tensor(images[name], tf.uint8)), run.dtypes[name])
        for name, backbone in run.backbones.items()
    }


def fused_probabilities(run: TrainedRun, images: dict) -> tf.Tensor:
    """uint8 pixels per backbone {name: (b, s, s, 1)} -> (b, L) probabilities; eager or traced."""
    return head_probabilities(run, cached_features(run, images))


def head_probabilities(run: TrainedRun, features: dict) -> tf.Tensor:
    """Features per backbone, rounded as the cache holds them {name: (b, D)} -> (b, L) probabilities."""
    return run.head(_head_inputs(run.head, features), training=False)


def decided(run: TrainedRun, probabilities: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(calibrated probabilities, int32 calls) from the head's probabilities; eager or traced."""
    calibrated = run.calibrate(probabilities)
    return calibrated, run.call(calibrated)


def _head_inputs(head: keras.Model, features: dict):
    """Features in the structure the functional head was built with (one tensor, a list or a dict)."""
    if isinstance(head.input, dict):
        return features
    ordered = [features[t.name] for t in head.inputs]
    return ordered if isinstance(head.input, (list, tuple)) else ordered[0]


def list_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded to the PNG and DICOM (.dcm) files directly inside them (sorted)."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            try:
                found = sorted(
                    p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                )
            except OSError as err:
                raise InputError(f"{item}: cannot list the folder ({err.strerror})") from None
            if not found:
                raise InputError(
                    f"{item}: folder holds no .png or .dcm files; pass PNG or DICOM files or a folder of them"
                )
            paths.extend(found)
        else:
            paths.append(item)  # a missing or broken file is reported in its own result, not raised
    return paths


def predict_images(
    *,
    run_dir: Path,
    inputs: Sequence[Path],
    config: Config,
    heatmap_dir: Path | None = None,
    heatmap_top: int = 3,
    heatmap_method: str = "auto",
) -> list[dict]:
    """Per image: calibrated probabilities, the uncalibrated ones, a call per label, and the run's warning
    (if any); an image that cannot be read gets an error and the rest still run.

    With heatmap_dir, also the `heatmap_top` most probable findings' heatmaps per image, made by
    `heatmap_method` (heads/heatmap.py).
    """
    run = load_run(run_dir)
    paths = list_images(inputs)
    if heatmap_dir is not None:
        from heads import heatmap

        heatmap.heatmap_method(run, heatmap_method)  # an impossible method fails before any work
    batch_size = config.extract.batch_size
    results = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start : start + batch_size]
        results.extend(_predict_batch(run, batch, max_pixels=config.extract.max_pixels))
    if heatmap_dir is not None:
        heatmap.write_heatmaps(run, results, out_dir=heatmap_dir, top=heatmap_top, method=heatmap_method)
    return results


def _predict_batch(run: TrainedRun, paths: Sequence[Path], *, max_pixels: int) -> list[dict]:
    images = {name: [] for name in run.backbones}
    errors = {}
    for i, path in enumerate(paths):
        try:
            loaded = {
                name: load_image(path, backbone.spec, max_pixels=max_pixels)
                for name, backbone in run.backbones.items()
            }
        except ImageError as err:
            errors[i] = err.reason
            continue
        for name, image in loaded.items():
            images[name].append(image)
    good = [i for i in range(len(paths)) if i not in errors]
    by_position = {}
    if good:
        raw = fused_probabilities(run, {k: np.stack(v) for k, v in images.items()})
        calibrated, calls = decided(run, raw)
        by_position = dict(
            zip(good, zip(raw.numpy(), calibrated.numpy(), calls.numpy(), strict=True), strict=True)
        )
    results = []
    for i, path in enumerate(paths):
        result = {"image": str(path), "probabilities": None, "uncalibrated": None, "calls": None}
        if i in errors:
            result["error"] = errors[i]
        else:
            raw, calibrated, calls = by_position[i]
            result["probabilities"] = dict(zip(run.labels, map(float, calibrated), strict=True))
            result["uncalibrated"] = dict(zip(run.labels, map(float, raw), strict=True))
            result["calls"] = dict(zip(run.labels, call_names(calls), strict=True))
            result["error"] = None
        results.append(result | {"warning": run.warning or None})
    return results


def format_predictions(results: list[dict], *, fmt: str = "table", csv_path: Path | None = None) -> str:
    """A table or one JSON document; with csv_path, write the CSV there and return a one-line note."""
    if csv_path is not None:
        return write_csv(results, Path(csv_path))
    if fmt not in FORMATS:
        raise InputError(f"output format {fmt!r} is not one of: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(results, indent=2)
    return format_table(results)


def _labels_of(results: list[dict]) -> list[str]:
    return next((list(r["probabilities"]) for r in results if r.get("probabilities")), [])


CALL_MARK = {"positive": "+", "negative": " ", None: "?"}


def _has_calls(results: list[dict]) -> bool:
    return any(c is not None for r in results for c in (r.get("calls") or {}).values())


def _cell(result: dict, label: str, width: int, *, calls: bool) -> str:
    """A probability and its call mark: "+" positive, " " negative, "?" a label without an operating
    point (no mark at all for a run made before operating points existed)."""
    mark = CALL_MARK[(result.get("calls") or {}).get(label)] if calls else " "
    return f"{result['probabilities'][label]:>{width - 1}.3f}{mark}"


def format_table(results: list[dict]) -> str:
    """One row per image, one column per label (calibrated probability, + for a positive call);
    unreadable images say why."""
    labels = _labels_of(results)
    image_width = max([len("image"), *(len(r["image"]) for r in results)])
    widths = [max(len(label), 6) for label in labels]
    lines = [
        "  ".join(
            [f"{'image':<{image_width}}", *(f"{lb:>{w}}" for lb, w in zip(labels, widths, strict=True))]
        )
    ]
    for r in results:
        if r.get("error"):
            lines.append(f"{r['image']:<{image_width}}  error: {r['error']}")
        else:
            cells = (_cell(r, lb, w, calls=_has_calls(results)) for lb, w in zip(labels, widths, strict=True))
            lines.append("  ".join([f"{r['image']:<{image_width}}", *cells]))
    failed = sum(1 for r in results if r.get("error"))
    lines.append(f"{count(len(results) - failed, 'image')} predicted, {failed} could not be read")
    if _has_calls(results):
        lines.append(
            "calibrated probabilities; + marks a positive call at the run's operating point (chosen on "
            "validation), ? a label without one"
        )
    return "\n".join(lines)


def write_csv(results: list[dict], path: Path) -> str:
    """image, a calibrated probability per label, a call per label (positive, negative or empty), error;
    returns a note saying where it went."""
    labels = _labels_of(results)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *labels, *(f"{lb} call" for lb in labels), "error"])
        for r in results:
            probs, calls = r.get("probabilities") or {}, r.get("calls") or {}
            writer.writerow(
                [
                    r["image"],
                    *(probs.get(lb, "") for lb in labels),
                    *(calls.get(lb) or "" for lb in labels),
                    r.get("error") or "",
                ]
            )
    failed = sum(1 for r in results if r.get("error"))
    return f"wrote {len(results)} rows to {path} ({failed} could not be read)"
