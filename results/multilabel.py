"""Multi-label metrics of a run's calls at its operating points (thresholds chosen on validation):
Hamming loss, subset accuracy, example-based and macro F1 on the calls, and label-ranking average
precision and coverage error on the calibrated probabilities, each with a patient-bootstrap interval.

The values are scikit-learn's. Choices where a metric has no natural value:
* Labels without a threshold (one class in validation) make no call, so every metric leaves them out; the
  block lists the labels it used.
* F1 divides by zero on an image with no finding and no call (example-based) and on a label with no
  positive and no call (macro): both count 0 (`zero_division=0`), so a "No Finding" film rightly called
  empty scores 0; the block counts those images.
* Ranking metrics mean nothing on an image without a finding (scikit-learn scores its label-ranking
  average precision 1 and its coverage 0 whatever the scores): both are measured on the images with at
  least one finding, and the block says how many.

Every metric is a ratio of per-image (or per-label count) sums, so one patient_bootstrap_sums call gives
all the intervals: ~0.06 s for 1,000 resamples of 11,000 images x 14 labels on one core (scikit-learn's
label-ranking average precision, a Python loop over images, takes ~1.2 s of the ~1.3 s).
"""

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    coverage_error,
    f1_score,
    hamming_loss,
    label_ranking_average_precision_score,
)

from cxr14.errors import InputError
from results.metrics import check_scores, patient_bootstrap_sums, percentile_ci
from results.record import MULTILABEL_METRICS

ZERO_DIVISION = 0  # F1's value where it divides by zero, passed to scikit-learn and used in the bootstrap


def point_estimates(y_true: np.ndarray, calls: np.ndarray, scores: np.ndarray) -> dict:
    """scikit-learn's value of each metric (None for the ranking ones when no image has a finding)."""
    findings = y_true.any(axis=1)
    ranked = bool(findings.any())
    return {
        "hamming_loss": float(hamming_loss(y_true, calls)),
        "subset_accuracy": float(accuracy_score(y_true, calls)),
        "f1_samples": float(f1_score(y_true, calls, average="samples", zero_division=ZERO_DIVISION)),
        "f1_macro": float(f1_score(y_true, calls, average="macro", zero_division=ZERO_DIVISION)),
        "lrap": float(label_ranking_average_precision_score(y_true[findings], scores[findings]))
        if ranked
        else None,
        "coverage_error": float(coverage_error(y_true[findings], scores[findings])) if ranked else None,
    }


def _ranks(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: label-ranking average precision and coverage (as scikit-learn defines them; 0 for an
    image without a finding, which the sums then leave out). Ties rank at their worst, as there."""
    truth = y_true.astype(bool)
    at_or_above = scores[:, None, :] >= scores[:, :, None]  # [i, j, k]: label k ranks at or above j
    rank = at_or_above.sum(axis=2)
    rank_among_true = (at_or_above & truth[:, None, :]).sum(axis=2)
    n_true = truth.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        lrap = np.where(n_true > 0, (truth * rank_among_true / rank).sum(axis=1) / n_true, 0.0)
    lowest_true = np.where(truth, scores, np.inf).min(axis=1)
    coverage = np.where(n_true > 0, (scores >= lowest_true[:, None]).sum(axis=1), 0)
    return lrap, coverage


def per_image_terms(y_true: np.ndarray, calls: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(images, 7 + 3L): the sums every metric is a ratio of: image, its Hamming loss, exact match,
    example F1, finding, LRAP and coverage on findings, then each label's TP, FP and FN."""
    truth, called = y_true.astype(bool), calls.astype(bool)
    both = (truth & called).sum(axis=1)
    size = truth.sum(axis=1) + called.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(size > 0, 2.0 * both / size, float(ZERO_DIVISION))
    lrap, coverage = _ranks(y_true, scores)
    columns = [
        np.ones(len(truth)),
        (truth != called).mean(axis=1),
        (truth == called).all(axis=1),
        f1,
        truth.any(axis=1),
        lrap,
        coverage,
    ]
    cells = [truth & called, ~truth & called, truth & ~called]
    return np.column_stack([np.column_stack(columns), *cells]).astype(np.float64)


def ratios(sums: np.ndarray, n_labels: int) -> dict:
    """Each metric from the column sums of per_image_terms ((k,) or (R, k)); NaN where undefined."""
    sums = np.atleast_2d(sums)
    images, findings = sums[:, 0], sums[:, 4]
    tp, fp, fn = (sums[:, 7 + k * n_labels : 7 + (k + 1) * n_labels] for k in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        denominator = 2 * tp + fp + fn
        f1_label = np.where(
            denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), ZERO_DIVISION
        )
        return {
            "hamming_loss": sums[:, 1] / images,
            "subset_accuracy": sums[:, 2] / images,
            "f1_samples": sums[:, 3] / images,
            "f1_macro": f1_label.mean(axis=1),
            "lrap": np.where(findings > 0, sums[:, 5] / findings, np.nan),
            "coverage_error": np.where(findings > 0, sums[:, 6] / findings, np.nan),
        }


def multilabel_metrics(
    y_true,
    scores,
    thresholds,
    *,
    groups,
    label_names: Sequence[str],
    n_boot: int,
    seed: int,
    level: float = 0.95,
) -> dict:
    """The block metrics.json holds under "multilabel": each metric's value and patient-bootstrap
    interval for calls `scores >= thresholds` (NaN: no threshold, label left out), and the facts a reader
    needs (labels used, images, images with a finding, images with no finding and no call)."""
    y_true, scores = check_scores(y_true, scores)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (y_true.shape[1],) or len(label_names) != y_true.shape[1]:
        raise InputError(
            f"{len(thresholds)} thresholds and {len(label_names)} label names for {y_true.shape[1]} "
            "label columns: they must match"
        )
    used = ~np.isnan(thresholds)
    y_true, scores = y_true[:, used], scores[:, used]
    calls = (scores >= thresholds[used]).astype(np.int8)
    return {
        "labels": [name for name, use in zip(label_names, used, strict=True) if use],
        "without_threshold": [name for name, use in zip(label_names, used, strict=True) if not use],
        "images": int(len(y_true)),
        "images_with_findings": int(y_true.any(axis=1).sum()),
        "empty_images": int((~y_true.any(axis=1) & ~calls.any(axis=1)).sum()),
        "zero_division": ZERO_DIVISION,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "metrics": _estimates(y_true, calls, scores, groups=groups, n_boot=n_boot, seed=seed, level=level),
    }


def _estimates(y_true, calls, scores, *, groups, n_boot: int, seed: int, level: float) -> dict:
    """{metric: {"value", "ci"}}; all None when no label has a threshold (nothing is called)."""
    if y_true.shape[1] == 0:
        return {name: {"value": None, "ci": [None, None]} for name in MULTILABEL_METRICS}
    values = point_estimates(y_true, calls, scores)
    _, drawn = patient_bootstrap_sums(
        per_image_terms(y_true, calls, scores), groups=groups, n_boot=n_boot, seed=seed
    )
    replicates = ratios(drawn, y_true.shape[1])
    return {
        name: {
            "value": values[name],
            "ci": percentile_ci(replicates[name], level) if n_boot else [None, None],
        }
        for name in MULTILABEL_METRICS
    }
