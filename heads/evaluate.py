"""A trained head on cached rows: its inputs, its probabilities, and its metrics on a split."""

import json
from pathlib import Path

import keras
import numpy as np

from cxr14.errors import InputError
from heads.data import HeadData
from heads.metrics import evaluate
from heads.models import METADATA_INPUT

PREDICT_BATCH = 4096


def head_inputs(model: keras.Model, data: HeadData, rows: np.ndarray, *, all_views: bool = False) -> dict:
    """{input name: array} for `rows`; cached views beyond the plain one (view 0) only with all_views."""
    arrays = {}
    for tensor in model.inputs:
        name = tensor.name
        if name == METADATA_INPUT:
            if data.metadata is None:
                raise InputError("this head was trained with --metadata; load the data with metadata=True")
            arrays[name] = data.metadata[rows]
            continue
        if name not in data.features:
            raise InputError(
                f"the head takes backbone {name!r} but the loaded features are {list(data.features)}; "
                "pass the run's backbones (see its config.json)"
            )
        arrays[name] = _rows_of(
            data.features[name], rows, item_shape=tuple(tensor.shape[1:]), name=name, all_views=all_views
        )
    return arrays


def _rows_of(features: np.ndarray, rows: np.ndarray, *, item_shape: tuple, name: str, all_views: bool):
    """The requested rows, view 0 of a multi-view cache unless all views are wanted."""
    has_views = features.ndim == len(item_shape) + 2
    if features.shape[1 + has_views :] != item_shape:
        raise InputError(
            f"cached features of {name!r} have per-image shape {features.shape[1 + has_views :]} but the "
            f"head was built for {item_shape}; the cache was re-extracted differently: retrain the head"
        )
    if has_views and not all_views:
        return features[rows, 0]
    if len(rows) == len(features) and np.array_equal(rows, np.arange(len(features))):
        return features  # every row, in order: no copy of a large array
    return features[rows]


def predict_probabilities(model: keras.Model, data: HeadData, rows: np.ndarray) -> np.ndarray:
    """(len(rows), L) float32 probabilities from the plain (view 0) features."""
    return predict_arrays(model, head_inputs(model, data, rows), n=len(rows))


def predict_arrays(model: keras.Model, inputs: dict, *, n: int) -> np.ndarray:
    """Probabilities for already gathered inputs, in chunks; predict_on_batch skips fit-style data
    pipelines, which cost more than the head itself on a validation set each epoch."""
    chunks = [
        model.predict_on_batch({k: v[start : start + PREDICT_BATCH] for k, v in inputs.items()})
        for start in range(0, n, PREDICT_BATCH)
    ]
    if not chunks:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return np.concatenate([np.asarray(c, dtype=np.float32) for c in chunks])


def load_head(run_dir: Path) -> keras.Model:
    path = Path(run_dir) / "model.keras"
    if not path.is_file():
        raise InputError(f"{run_dir}: no model.keras (an unfinished run?); train it with run.py train-head")
    # compile=False: evaluation needs no loss or optimizer.
    return keras.saving.load_model(path, compile=False)


def run_labels(run_dir: Path) -> list[str]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{run_dir}: not a run folder (no config.json); train one with run.py train-head")
    labels = json.loads(path.read_text(encoding="utf-8")).get("labels")
    if not labels:
        raise InputError(f"{path}: no 'labels' list; the run folder is incomplete, train it again")
    return list(labels)


def check_labels(data: HeadData, label_names) -> None:
    """Refuse label names that are not the data's label columns, in order.

    The config may list a subset of the labels in any order; a run evaluated under another list would
    otherwise score each disease's probabilities against another disease's column.
    """
    label_names = list(label_names)
    columns = list(data.label_names) or [f"{data.labels.shape[1]} columns"]
    if data.labels.shape[1] != len(label_names) or (data.label_names and columns != label_names):
        raise InputError(
            f"the run's labels {label_names} are not the index's label columns {columns}; "
            "set [data] labels to the run's own (its config.json) and load the index again"
        )


def split_metrics(
    data: HeadData, scores: np.ndarray, *, split: str, label_names, n_boot: int, seed: int
) -> dict:
    """Metrics (heads.metrics.evaluate) of probabilities `scores` for the rows of `split`, in row order."""
    rows = data.rows(split)
    if rows.size == 0:
        raise InputError(f"the {split} split has no images with features; check the split lists and caches")
    check_labels(data, label_names)
    if scores.shape != (rows.size, len(label_names)):
        raise InputError(
            f"the head gives {scores.shape[1]} probabilities per image but the run lists "
            f"{len(label_names)} labels; use the labels the run was trained with"
        )
    metrics = evaluate(
        data.labels[rows],
        scores,
        groups=data.patients[rows],
        label_names=label_names,
        n_boot=n_boot,
        seed=seed,
    )
    return {**metrics, "split": split, "split_source": data.split_source}


def evaluate_run(*, run_dir: Path, data: HeadData, split: str = "test", n_boot: int, seed: int) -> dict:
    """Recompute a run's metrics on `split` from its model.keras; also written to evaluate-SPLIT.json."""
    run_dir = Path(run_dir)
    labels = run_labels(run_dir)
    scores = predict_probabilities(load_head(run_dir), data, data.rows(split))
    metrics = split_metrics(data, scores, split=split, label_names=labels, n_boot=n_boot, seed=seed)
    metrics = {**metrics, "run": run_dir.name, "excluded": data.excluded}
    (run_dir / f"evaluate-{split}.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics
