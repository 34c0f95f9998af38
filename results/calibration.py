"""Per-label calibration fitted on the validation split: Platt, isotonic, or one shared temperature
(its error is measured by results.metrics.expected_calibration_error).

A calibration is a JSON-able dict, stored in the run as calibration.json. It is applied by one function
of TensorFlow ops (`calibrator`), the same in evaluation, predict and the exported SavedModel, so all
three give the same float32 numbers.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression

from cxr14.errors import InputError
from results.logistic import fit_logistic
from results.settings import CALIBRATIONS

# Probabilities are clipped to [EPS, 1 - EPS] (in float32) before taking log-odds.
EPS = 1e-6
# A small ridge (on the summed log loss) keeps the Platt slope finite when validation separates a label.
PLATT_RIDGE = 1e-3


def log_odds(probabilities) -> np.ndarray:
    """float32 log-odds of clipped probabilities, computed as the TensorFlow calibrator does."""
    return _log_odds(tf.constant(np.asarray(probabilities, dtype=np.float32))).numpy().astype(np.float64)


def _log_odds(p: tf.Tensor) -> tf.Tensor:
    p = tf.clip_by_value(tf.cast(p, tf.float32), EPS, 1.0 - EPS)
    return tf.math.log(p) - tf.math.log1p(-p)


def _one_class(y: np.ndarray) -> bool:
    return y.min() == y.max()


def _fit_platt(x: np.ndarray, y: np.ndarray, defined: np.ndarray) -> dict[int, dict]:
    """Per label with both classes, slope and intercept of sigmoid(a * log_odds + b) by maximum likelihood
    (a tiny ridge). Platt's smoothed targets were tried and raised the demo's test ECE (0.038 -> 0.042)."""
    columns = np.flatnonzero(defined)
    weights = fit_logistic(x[:, columns, None], y[:, columns], ridge=PLATT_RIDGE)
    return {int(j): {"a": float(w[1]), "b": float(w[0])} for j, w in zip(columns, weights, strict=True)}


def _fit_temperature(x: np.ndarray, y: np.ndarray, defined: np.ndarray) -> float:
    """The one temperature T (sigmoid(log_odds / T)) that best fits every label with both classes."""
    x, y = x[:, defined], y[:, defined]

    def loss(log_inverse_t):
        z = math.exp(log_inverse_t) * x
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    best = minimize_scalar(loss, bounds=(-5.0, 5.0), method="bounded")
    return float(math.exp(-best.x))


def _fit_isotonic(p: np.ndarray, y: np.ndarray) -> dict:
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    return {
        "x": fitted.X_thresholds_.astype(float).tolist(),
        "y": fitted.y_thresholds_.astype(float).tolist(),
    }


def fit_calibration(y_val, p_val, *, method: str, label_names: Sequence[str], bins: int = 10) -> dict:
    """Calibration of each label fitted on validation labels and probabilities; JSON-ready.

    A label with one class in validation cannot be fitted: it keeps its probabilities ("identity").
    """
    if method not in CALIBRATIONS:
        raise InputError(f"decision.calibration = {method!r} is not one of: {', '.join(CALIBRATIONS)}")
    y = np.asarray(y_val, dtype=np.float64)
    p = np.asarray(p_val, dtype=np.float32)
    defined = np.array([not _one_class(y[:, j]) for j in range(y.shape[1])]) if len(y) else np.zeros(0, bool)
    result = {"method": method, "fitted_on": "val", "images": int(len(y)), "bins": int(bins), "labels": {}}
    if method == "none" or not defined.any():
        result["labels"] = {name: {"identity": True} for name in label_names}
        return result
    x = log_odds(p)
    if method == "temperature":
        result["temperature"] = _fit_temperature(x, y, defined)
    platt = _fit_platt(x, y, defined) if method == "platt" else {}
    for j, name in enumerate(label_names):
        if not defined[j]:
            result["labels"][name] = {"identity": True}
        elif method == "platt":
            result["labels"][name] = platt[j]
        elif method == "temperature":
            result["labels"][name] = {"a": 1.0 / result["temperature"], "b": 0.0}
        else:
            result["labels"][name] = _fit_isotonic(p[:, j].astype(np.float64), y[:, j])
    return result


def calibrator(calibration: dict | None, *, label_names: Sequence[str]) -> Callable[[tf.Tensor], tf.Tensor]:
    """(b, L) float32 probabilities -> calibrated (b, L), as TensorFlow ops (eager or traced)."""
    if not calibration or calibration.get("method", "none") == "none":
        return tf.identity
    params = [calibration["labels"].get(name, {"identity": True}) for name in label_names]
    identity = tf.constant([bool(p.get("identity")) for p in params])
    if calibration["method"] == "isotonic":
        fitted = _isotonic_fn(params)
    else:
        a = tf.constant([p.get("a", 1.0) for p in params], tf.float32)
        b = tf.constant([p.get("b", 0.0) for p in params], tf.float32)

        def fitted(probabilities):
            return tf.math.sigmoid(a * _log_odds(probabilities) + b)

    def calibrate(probabilities):
        probabilities = tf.cast(probabilities, tf.float32)
        return tf.where(identity, probabilities, fitted(probabilities))

    return calibrate


def _isotonic_fn(params: list[dict]) -> Callable[[tf.Tensor], tf.Tensor]:
    """Piecewise-linear interpolation through each label's fitted points (np.interp's rule, clipped ends)."""
    width = max(2, *(len(p.get("x", [])) for p in params))

    def padded(values: list[float]) -> list[float]:
        values = list(values) or [0.0]
        return values + [values[-1]] * (width - len(values))

    xs = tf.constant([padded(p.get("x", [0.0, 1.0])) for p in params], tf.float32)  # (L, K)
    ys = tf.constant([padded(p.get("y", [0.0, 1.0])) for p in params], tf.float32)

    def fitted(probabilities):
        values = tf.transpose(probabilities)  # (L, b)
        upper = tf.clip_by_value(tf.searchsorted(xs, values, side="right"), 1, width - 1)
        x0, x1 = tf.gather(xs, upper - 1, batch_dims=1), tf.gather(xs, upper, batch_dims=1)
        y0, y1 = tf.gather(ys, upper - 1, batch_dims=1), tf.gather(ys, upper, batch_dims=1)
        share = tf.clip_by_value(tf.math.divide_no_nan(values - x0, x1 - x0), 0.0, 1.0)
        return tf.transpose(y0 + share * (y1 - y0))

    return fitted


def apply_calibration(calibration: dict | None, probabilities, *, label_names: Sequence[str]) -> np.ndarray:
    """Calibrated float32 probabilities of a numpy array, by the same ops predict and export use."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if len(probabilities) == 0:
        return probabilities
    return np.asarray(calibrator(calibration, label_names=label_names)(tf.constant(probabilities)))
