"""Operating points: one threshold per label, chosen on the validation split's calibrated probabilities,
and the positive/negative calls they make (the same TensorFlow ops in predict and the exported model).

A probability at or above its label's threshold is a positive call. A label with one class in validation
has no threshold (null): it gets no call.
"""

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_curve

from cxr14.errors import InputError
from results.settings import OPERATING_POINTS

NO_CALL = -1  # the exported model's call for a label without a threshold (1 positive, 0 negative)


def _index(fpr: np.ndarray, tpr: np.ndarray, *, method: str, target: float) -> int:
    """Which point of the ROC curve (thresholds decreasing, point 0 calls nothing positive) to use."""
    if method == "youden":
        return int(np.argmax(tpr[1:] - fpr[1:])) + 1  # first (highest threshold) of equal maxima
    if method == "sensitivity":
        return int(np.flatnonzero(tpr >= target - 1e-12)[0])  # the highest threshold reaching it
    return int(np.flatnonzero(fpr <= 1.0 - target + 1e-12)[-1])  # specificity: the lowest reaching it


def _threshold(y: np.ndarray, p: np.ndarray, *, method: str, target: float) -> dict:
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    k = _index(fpr, tpr, method=method, target=target)
    # Point 0 (threshold +inf) calls nothing positive: use the next float32 above the highest probability.
    threshold = thresholds[k] if k > 0 else np.nextafter(np.float32(p.max()), np.float32(np.inf))
    return {
        "threshold": float(np.float32(threshold)),
        "sensitivity": float(tpr[k]),
        "specificity": float(1.0 - fpr[k]),
    }


def choose_thresholds(y_val, p_val, *, method: str, target: float, label_names: Sequence[str]) -> dict:
    """{"method", "target", "fitted_on", "labels": {name: {threshold, sensitivity, specificity}}} from
    validation labels and calibrated probabilities; JSON-ready."""
    if method not in OPERATING_POINTS:
        raise InputError(
            f"decision.operating_point = {method!r} is not one of: {', '.join(OPERATING_POINTS)}"
        )
    y = np.asarray(y_val)
    p = np.asarray(p_val, dtype=np.float32)
    labels = {}
    for j, name in enumerate(label_names):
        if len(y) == 0 or y[:, j].min() == y[:, j].max():
            labels[name] = {"threshold": None, "sensitivity": None, "specificity": None}
        else:
            labels[name] = _threshold(y[:, j], p[:, j], method=method, target=target)
    return {
        "method": method,
        "target": None if method == "youden" else float(target),
        "fitted_on": "val",
        "images": int(len(y)),
        "scale": "calibrated probability",
        "labels": labels,
    }


def threshold_array(thresholds: dict | None, *, label_names: Sequence[str]) -> np.ndarray:
    """(L,) float32 thresholds in label order; NaN where a label has none (or the run has no thresholds)."""
    if not thresholds:
        return np.full(len(label_names), np.nan, np.float32)
    values = [thresholds["labels"].get(name, {}).get("threshold") for name in label_names]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float32)


def caller(thresholds: dict | None, *, label_names: Sequence[str]) -> Callable[[tf.Tensor], tf.Tensor]:
    """(b, L) calibrated probabilities -> (b, L) int32 calls: 1 positive, 0 negative, NO_CALL without a
    threshold; TensorFlow ops, eager or traced."""
    values = threshold_array(thresholds, label_names=label_names)
    has = tf.constant(~np.isnan(values))
    cut = tf.constant(np.nan_to_num(values, nan=np.inf), tf.float32)

    def call(probabilities):
        positive = tf.cast(tf.cast(probabilities, tf.float32) >= cut, tf.int32)
        return tf.where(has, positive, tf.fill(tf.shape(positive), NO_CALL))

    return call


def call_names(calls: np.ndarray) -> list:
    """Int calls as words for people and JSON: "positive", "negative", or None without a threshold."""
    return [{1: "positive", 0: "negative"}.get(int(c)) for c in calls]
