"""A trained head on cached rows: its probabilities, and its metrics on a split."""

from pathlib import Path

import keras
import numpy as np

from cxr14.errors import InputError
from heads.data import HeadData, head_inputs
from heads.metrics import label_metrics
from heads.run_folder import load_model, run_labels, write_json

PREDICT_BATCH = 4096


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
    """Metrics (heads.metrics.label_metrics) of probabilities `scores` for the rows of `split`, in row order."""
    rows = data.rows(split)
    if rows.size == 0:
        raise InputError(f"the {split} split has no images with features; check the split lists and caches")
    check_labels(data, label_names)
    if scores.shape != (rows.size, len(label_names)):
        raise InputError(
            f"the head gives {scores.shape[1]} probabilities per image but the run lists "
            f"{len(label_names)} labels; use the labels the run was trained with"
        )
    metrics = label_metrics(
        data.labels[rows],
        scores,
        groups=data.patients[rows],
        label_names=label_names,
        n_boot=n_boot,
        seed=seed,
    )
    return {**metrics, "split": split, "split_source": data.split_source}


def score_run(*, run_dir: Path, data: HeadData, split: str = "test", n_boot: int, seed: int) -> dict:
    """A run's metrics on `split`, recomputed from its model.keras; also written to evaluate-SPLIT.json."""
    run_dir = Path(run_dir)
    labels = run_labels(run_dir)
    scores = predict_probabilities(load_model(run_dir), data, data.rows(split))
    metrics = split_metrics(data, scores, split=split, label_names=labels, n_boot=n_boot, seed=seed)
    metrics = {**metrics, "run": run_dir.name, "excluded": data.excluded}
    write_json(run_dir / f"evaluate-{split}.json", metrics)
    return metrics
