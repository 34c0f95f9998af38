"""A trained run loaded for use: its backbones rebuilt from config.json, its head from model.keras, and the
calibration and operating points fitted on validation; images in, probabilities and calls out."""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from cxr14.caveats import SYNTHETIC_NOTICE, not_medical_warning, random_weight_backbones
from cxr14.errors import InputError
from extract.backbones import load_backbone
from extract.settings import BackboneConfig
from heads.run_folder import (
    check_recorded_labels,
    load_model,
    read_config,
    read_decisions,
    read_run_projection,
)
from results.calibration import calibrator
from results.operating import caller

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
    backbones = {name: _backbone(run_dir, name, plan["backbones"][name]) for name in names}
    _check_shapes(run_dir, head=head, backbones=backbones)
    labels = tuple(plan["labels"])
    check_recorded_labels(run_dir, list(labels))
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


def _backbone(run_dir: Path, name: str, settings: dict | None):
    """The backbone `name` as the run's cache was extracted with it; its tokens projected as stage one
    projected them where it reduced their channels (map_channels: the run keeps that projection)."""
    config = _backbone_config(run_dir, name, settings)
    projected = read_run_projection(run_dir, name) if settings.get("map_channels") else None
    return load_backbone(config, projection=projected)


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
        shapes = {"features": (backbone.dim,), "tokens": (backbone.tokens, backbone.dim)}
        gives = shapes.get(backbone.kind, (backbone.dim, backbone.dim))
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
