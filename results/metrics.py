"""Per-disease ROC AUC and PR AUC, and confidence intervals from a bootstrap over patients.

A label with only one class in a split has no AUC: it is NaN here and null in JSON, never 0 and never
dropped. The bootstrap resamples patients, not images, because images of one patient are correlated;
resampling images would give intervals that are too narrow.
"""

import collections
import hashlib
import math
from collections.abc import Sequence

import numpy as np
from scipy import sparse
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr14.errors import InputError

# Resamples drawn together; bounds memory at chunk x patients counts.
_CHUNK = 250


def check_scores(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels as int8 and finite scores as float64, both (images, labels), or an InputError."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_score.shape:
        raise InputError(
            f"labels and scores must both be (images, labels) arrays of one shape; "
            f"received labels {y_true.shape} and scores {y_score.shape}"
        )
    if y_true.shape[0] == 0:
        raise InputError("no images to evaluate: the split is empty")
    if not np.isin(y_true, (0, 1)).all():
        raise InputError("labels must be 0 or 1; received other values: fix the label array")
    if not np.isfinite(y_score).all():
        raise InputError("scores contain NaN or infinity: check the model's predictions")
    return y_true.astype(np.int8), y_score


def _check_groups(groups, n_images: int) -> np.ndarray:
    groups = np.asarray(groups)
    if groups.shape != (n_images,):
        raise InputError(
            f"groups must give one patient per image ({n_images}); received shape {groups.shape}"
        )
    return groups


def _defined(y_true: np.ndarray) -> np.ndarray:
    positives = y_true.sum(axis=0)
    return (positives > 0) & (positives < y_true.shape[0])


def roc_auc_per_label(y_true, y_score) -> np.ndarray:
    """ROC AUC per label (scikit-learn), NaN where a label has only one class."""
    y_true, y_score = check_scores(y_true, y_score)
    defined = _defined(y_true)
    return np.array(
        [roc_auc_score(y_true[:, j], y_score[:, j]) if defined[j] else np.nan for j in range(y_true.shape[1])]
    )


def pr_auc_per_label(y_true, y_score) -> np.ndarray:
    """Average precision per label, NaN where a label has no positives (precision is then undefined)."""
    y_true, y_score = check_scores(y_true, y_score)
    has_positive = y_true.sum(axis=0) > 0
    return np.array(
        [
            average_precision_score(y_true[:, j], y_score[:, j]) if has_positive[j] else np.nan
            for j in range(y_true.shape[1])
        ]
    )


def mean_defined(values) -> float:
    """Mean over the non-NaN values; NaN when there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _label_incidence(y_true, y_score, *, units: np.ndarray, n_units: int) -> tuple:
    """Sparse (groups, units) counts of positive and of negative images per unit in each score group.

    Groups run along the sorted scores: a maximal run of tied scores holding both classes is one group
    (its pairs count half, as in the Mann-Whitney statistic); runs of one class in a row are merged, which
    changes nothing in the statistic but leaves about 2 x min(positives, negatives) groups instead of N.
    """
    order = np.argsort(y_score, kind="stable")
    score_sorted, positive_sorted = y_score[order], y_true[order].astype(np.int64)
    tie_of_sorted = np.cumsum(np.r_[True, score_sorted[1:] != score_sorted[:-1]]) - 1
    positives_in_tie = np.bincount(tie_of_sorted, weights=positive_sorted)
    kind = np.where(positives_in_tie == 0, 0, 1 + (positives_in_tie < np.bincount(tie_of_sorted)))
    group_of_tie = np.cumsum(np.r_[True, (kind[1:] != kind[:-1]) | (kind[1:] == 2)]) - 1
    group = np.empty_like(order)
    group[order] = group_of_tie[tie_of_sorted]
    n_groups = int(group_of_tie[-1]) + 1
    is_positive = y_true.astype(bool)

    def incidence(rows: np.ndarray) -> sparse.csr_matrix:
        ones = np.ones(int(rows.sum()))
        return sparse.csr_matrix((ones, (group[rows], units[rows])), shape=(n_groups, n_units))

    return incidence(is_positive), incidence(~is_positive)


def _auc_of_weights(incidences: tuple, unit_weights: np.ndarray) -> np.ndarray:
    """Weighted AUC for each row of unit_weights (R, units); NaN where a row leaves one class."""
    positive_incidence, negative_incidence = incidences
    pos = np.asarray(positive_incidence @ unit_weights.T).T
    neg = np.asarray(negative_incidence @ unit_weights.T).T
    neg_below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def _patient_counts(n_patients: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_patients) how often each patient is drawn when drawing n_patients with replacement."""
    draws = rng.integers(0, n_patients, size=(n_boot, n_patients))
    offsets = np.arange(n_boot)[:, None] * n_patients
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * n_patients).reshape(n_boot, n_patients)


def _interval(replicates: np.ndarray, level: float) -> np.ndarray:
    finite = replicates[~np.isnan(replicates)]
    if finite.size == 0:
        return np.array([np.nan, np.nan])
    tail = (1.0 - level) / 2.0
    return np.quantile(finite, [tail, 1.0 - tail])


def bootstrap_auc(y_true, y_score, *, groups, n_boot: int, seed: int, level: float = 0.95) -> dict:
    """Percentile intervals for each label's ROC AUC and their mean, resampling patients (groups).

    Returns {"per_label": (L, 2) low/high, "mean": (2,), "replicates": (L,) usable resamples per label,
    "mean_replicates": int}. A resample in which a label has one class is skipped for that label; the
    mean is over the labels defined on the full data, and a resample where any of them is one-class is
    skipped for the mean (so every mean replicate averages the same labels).
    """
    y_true, y_score = check_scores(y_true, y_score)
    _check_level(level)
    replicates = _replicates(y_true, y_score, groups=groups, n_boot=n_boot, seed=seed)
    complete, means = _mean_replicates(y_true, replicates)
    return {
        "per_label": np.array([_interval(replicates[:, j], level) for j in range(y_true.shape[1])]).reshape(
            -1, 2
        ),
        "mean": _interval(means, level),
        "replicates": (~np.isnan(replicates)).sum(axis=0),
        "mean_replicates": int(complete.sum()),
    }


def bootstrap_difference(
    y_true, score_a, score_b, *, groups, n_boot: int, seed: int, level: float = 0.95
) -> dict:
    """Mean ROC AUC of `score_a` minus that of `score_b` on the same images, with a paired patient-bootstrap
    interval: both are scored on the very same resamples, so what they share cancels out. Also each one's
    own mean interval from those resamples ("mean_ci_a", "mean_ci_b": bootstrap_auc's "mean" for the seed)."""
    y_true, score_a = check_scores(y_true, score_a)
    _, score_b = check_scores(y_true, score_b)
    _check_level(level)
    difference = mean_defined(roc_auc_per_label(y_true, score_a)) - mean_defined(
        roc_auc_per_label(y_true, score_b)
    )
    if n_boot == 0:
        return {
            "difference": _json_float(difference),
            "ci": [None, None],
            "mean_ci_a": [None, None],
            "mean_ci_b": [None, None],
        }
    # The same seed draws the same patients for both.
    _, means_a = _mean_replicates(
        y_true, _replicates(y_true, score_a, groups=groups, n_boot=n_boot, seed=seed)
    )
    _, means_b = _mean_replicates(
        y_true, _replicates(y_true, score_b, groups=groups, n_boot=n_boot, seed=seed)
    )
    return {
        "difference": _json_float(difference),
        "ci": [_json_float(v) for v in _interval(means_a - means_b, level)],
        "mean_ci_a": [_json_float(v) for v in _interval(means_a, level)],
        "mean_ci_b": [_json_float(v) for v in _interval(means_b, level)],
    }


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise InputError(f"confidence level must be between 0 and 1; received level={level}")


# Replicates already drawn, by what they depend on. One scoring asks for the same ones several times (a
# head's own intervals, then its difference to the probe and to the metadata baseline, one seed), and a
# sweep's trials for the probe's and the baseline's again and again; the draw is a pure function of
# labels, scores, patients, n_boot and seed, so a repeat is looked up, not redrawn.
_DRAWN: collections.OrderedDict = collections.OrderedDict()
_DRAWN_KEPT = 32  # at 1,000 resamples x 14 labels, 112 KB each


def _replicates(y_true: np.ndarray, y_score: np.ndarray, *, groups, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, L) AUC per label on each patient resample (NaN where one-class or undefined on the data)."""
    groups = _check_groups(groups, y_true.shape[0])
    patients, patient_of_image = np.unique(groups, return_inverse=True)
    key = _draw_key(y_true, y_score, patient_of_image, n_boot=n_boot, seed=seed)
    if key not in _DRAWN:
        _DRAWN[key] = _draw_replicates(
            y_true, y_score, patient_of_image, n_patients=patients.size, n_boot=n_boot, seed=seed
        )
        if len(_DRAWN) > _DRAWN_KEPT:
            _DRAWN.popitem(last=False)
    _DRAWN.move_to_end(key)
    return _DRAWN[key].copy()


def _draw_key(*arrays: np.ndarray, n_boot: int, seed: int) -> tuple:
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest(), int(n_boot), int(seed)


def _draw_replicates(y_true, y_score, patient_of_image, *, n_patients: int, n_boot: int, seed: int):
    n_labels = y_true.shape[1]
    replicates = np.full((n_boot, n_labels), np.nan)
    incidences = [
        _label_incidence(y_true[:, j], y_score[:, j], units=patient_of_image, n_units=n_patients)
        for j in range(n_labels)
    ]
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, _CHUNK):
        counts = _patient_counts(n_patients, min(_CHUNK, n_boot - start), rng).astype(np.float64)
        for j, label_incidence in enumerate(incidences):
            replicates[start : start + counts.shape[0], j] = _auc_of_weights(label_incidence, counts)
    replicates[:, ~_defined(y_true)] = np.nan
    return replicates


def _mean_replicates(y_true: np.ndarray, replicates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which resamples define every label defined on the data, and their mean AUCs. Whether a resample
    is complete depends on the labels and the draw alone, so two score sets of one seed pair up."""
    defined = _defined(y_true)
    if not defined.any():
        return np.zeros(replicates.shape[0], bool), np.empty(0)
    complete = ~np.isnan(replicates[:, defined]).any(axis=1)
    return complete, replicates[complete][:, defined].mean(axis=1)


def _json_float(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def label_metrics(y_true, y_score, *, groups, label_names: Sequence[str], n_boot: int, seed: int) -> dict:
    """Per-label and mean ROC AUC with patient-bootstrap 95% intervals, PR AUC and counts; JSON-ready.

    Undefined values are None (null in JSON); labels without an AUC are listed under "undefined".
    n_boot=0 skips the bootstrap and leaves every interval [None, None].
    """
    y_true, y_score = check_scores(y_true, y_score)
    groups = _check_groups(groups, y_true.shape[0])
    if len(label_names) != y_true.shape[1]:
        raise InputError(
            f"{len(label_names)} label names for {y_true.shape[1]} label columns: they must match"
        )
    aucs = roc_auc_per_label(y_true, y_score)
    pr_aucs = pr_auc_per_label(y_true, y_score)
    if n_boot > 0:
        boot = bootstrap_auc(y_true, y_score, groups=groups, n_boot=n_boot, seed=seed)
        per_label_ci, mean_ci = boot["per_label"], boot["mean"]
    else:
        per_label_ci, mean_ci = np.full((len(label_names), 2), np.nan), np.full(2, np.nan)
    positives = y_true.sum(axis=0)
    labels = {
        name: {
            "auc": _json_float(aucs[j]),
            "ci": [_json_float(v) for v in per_label_ci[j]],
            "pr_auc": _json_float(pr_aucs[j]),
            "positives": int(positives[j]),
            "negatives": int(y_true.shape[0] - positives[j]),
            "defined": bool(not np.isnan(aucs[j])),
        }
        for j, name in enumerate(label_names)
    }
    return {
        "labels": labels,
        "mean_auc": _json_float(mean_defined(aucs)),
        "mean_ci": [_json_float(v) for v in mean_ci],
        "mean_pr_auc": _json_float(mean_defined(pr_aucs)),
        "images": int(y_true.shape[0]),
        "patients": int(np.unique(groups).size),
        "undefined": [name for j, name in enumerate(label_names) if np.isnan(aucs[j])],
        "n_boot": int(n_boot),
        "seed": int(seed),
    }


RATES = ("sensitivity", "specificity", "ppv", "npv")


def _rates(tp, fp, tn, fn) -> dict:
    """Sensitivity, specificity, PPV and NPV from counts (arrays of one shape); NaN where undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
        }


def patient_bootstrap_sums(per_image, *, groups, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Column sums of `per_image` (images, k) over every image, (k,), and over each of n_boot patient
    resamples, (n_boot, k): a resample counts an image as often as its patient is drawn.

    Summing per patient first makes a chunk of resamples cost one matrix product, whatever the metric,
    so any metric that is a ratio of per-image sums gets its patient-bootstrap interval this way.
    """
    per_image = np.asarray(per_image, dtype=np.float64)
    _, patient = np.unique(_check_groups(groups, per_image.shape[0]), return_inverse=True)
    per_patient = np.zeros((int(patient.max()) + 1, per_image.shape[1]))
    np.add.at(per_patient, patient, per_image)
    drawn = [np.empty((0, per_image.shape[1]))]
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, _CHUNK):
        counts = _patient_counts(per_patient.shape[0], min(_CHUNK, n_boot - start), rng).astype(np.float64)
        drawn.append(counts @ per_patient)
    return per_patient.sum(axis=0), np.concatenate(drawn)


def percentile_ci(replicates, level: float = 0.95) -> list[float | None]:
    """The percentile interval [low, high] of a bootstrap's replicates, NaN ones skipped; JSON-ready."""
    return [_json_float(v) for v in _interval(np.asarray(replicates, dtype=np.float64), level)]


def rates_at_thresholds(
    y_true,
    y_score,
    thresholds,
    *,
    groups,
    label_names: Sequence[str],
    n_boot: int,
    seed: int,
    level: float = 0.95,
) -> dict:
    """Per label, the counts and sensitivity, specificity, PPV and NPV of calling score >= threshold
    positive, with patient-bootstrap percentile intervals; JSON-ready. A NaN threshold gives nulls.

    Each resample reweights every patient's confusion counts by how often the patient is drawn
    (patient_bootstrap_sums), so a chunk of resamples costs one matrix product.
    """
    y_true, y_score = check_scores(y_true, y_score)
    _check_level(level)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    has = ~np.isnan(thresholds)
    called, positive = y_score >= np.where(has, thresholds, np.inf), y_true.astype(bool)
    cells = (called & positive, called & ~positive, ~called & ~positive, ~called & positive)
    sums, drawn = patient_bootstrap_sums(
        np.concatenate(cells, axis=1), groups=groups, n_boot=n_boot, seed=seed
    )
    totals = sums.reshape(4, -1)
    point = _rates(*totals)
    replicates = _rates(*drawn.reshape(n_boot, 4, -1).transpose(1, 0, 2)) if n_boot else None
    result = {}
    for j, name in enumerate(label_names):
        entry = {
            cell: int(totals[k, j]) if has[j] else None for k, cell in enumerate(("tp", "fp", "tn", "fn"))
        }
        entry["threshold"] = _json_float(thresholds[j]) if has[j] else None
        for rate in RATES:
            ci = _interval(replicates[rate][:, j], level) if replicates and has[j] else (np.nan, np.nan)
            entry[rate] = {
                "value": _json_float(point[rate][j]) if has[j] else None,
                "ci": [_json_float(v) for v in ci],
            }
        result[name] = entry
    return result


def _bin_of(p: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum((p * bins).astype(np.int64), bins - 1)


def expected_calibration_error(y_true, y_prob, *, bins: int = 10) -> np.ndarray:
    """(L,) per label: sum over equal-width bins of (bin share) x |mean probability - share positive|."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(y_prob, dtype=np.float64), 0.0, 1.0)
    errors = np.zeros(y.shape[1])
    for j in range(y.shape[1]):
        which = _bin_of(p[:, j], bins)
        count = np.bincount(which, minlength=bins)
        gap = np.bincount(which, weights=p[:, j], minlength=bins) - np.bincount(
            which, weights=y[:, j], minlength=bins
        )
        errors[j] = np.abs(gap).sum() / max(count.sum(), 1)
    return errors


def reliability_curve(y_true, y_prob, *, bins: int = 10) -> dict:
    """Pooled over labels, per equal-width bin: mean probability, share positive and count (NaN if empty)."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.clip(np.asarray(y_prob, dtype=np.float64).ravel(), 0.0, 1.0)
    which = _bin_of(p, bins)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, weights=p, minlength=bins) / count
        positive = np.bincount(which, weights=y, minlength=bins) / count
    return {"mean_probability": mean_p, "positive_share": positive, "count": count}


def compare_scores(
    y_true,
    score_a,
    score_b,
    *,
    groups,
    label_names: Sequence[str],
    n_boot: int,
    seed: int,
    level: float = 0.95,
) -> dict:
    """Per label and on the mean: AUC of `score_a` minus that of `score_b` on the same images, with a paired
    patient-bootstrap percentile interval and a two-sided p-value; JSON-ready.

    The p-value is the bootstrap's own: the share of resampled differences at least as far from the
    observed one as the observed one is from 0 (the resampling distribution shifted to the null), plus one
    in numerator and denominator; two identical score sets give differences of 0 and p = 1. Both score sets
    are scored on the very same patient resamples (one seed), so what they share cancels out.
    """
    y_true, score_a = check_scores(y_true, score_a)
    _, score_b = check_scores(y_true, score_b)
    _check_level(level)
    observed = roc_auc_per_label(y_true, score_a) - roc_auc_per_label(y_true, score_b)
    mean = mean_defined(roc_auc_per_label(y_true, score_a)) - mean_defined(roc_auc_per_label(y_true, score_b))
    if n_boot > 0:
        rep_a = _replicates(y_true, score_a, groups=groups, n_boot=n_boot, seed=seed)
        rep_b = _replicates(y_true, score_b, groups=groups, n_boot=n_boot, seed=seed)
        per_label = rep_a - rep_b
        _, means_a = _mean_replicates(y_true, rep_a)
        _, means_b = _mean_replicates(y_true, rep_b)
        mean_replicates = means_a - means_b
    else:
        per_label, mean_replicates = np.full((0, len(label_names)), np.nan), np.empty(0)
    labels = {
        name: _difference_entry(observed[j], per_label[:, j], level=level)
        for j, name in enumerate(label_names)
    }
    return {
        "labels": labels,
        "mean": _difference_entry(mean, mean_replicates, level=level),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "level": level,
    }


def _difference_entry(observed: float, replicates: np.ndarray, *, level: float) -> dict:
    """One difference: its value, percentile interval and bootstrap p-value (None where undefined)."""
    finite = replicates[~np.isnan(replicates)]
    if math.isnan(observed) or finite.size == 0:
        return {"difference": _json_float(observed), "ci": [None, None], "p": None}
    # A tolerance keeps float rounding of two equal AUCs from counting as a difference.
    far = np.abs(finite - observed) >= abs(observed) - 1e-12
    return {
        "difference": _json_float(observed),
        "ci": [_json_float(v) for v in _interval(finite, level)],
        "p": float((1 + far.sum()) / (1 + finite.size)),
    }


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of p-values for testing them all at once (NaN stays NaN).

    Sorted ascending, the k-th smallest of m is multiplied by m - k + 1; a running maximum keeps the
    adjusted values in the order of the raw ones, and none exceeds 1."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    defined = np.flatnonzero(~np.isnan(p))
    order = defined[np.argsort(p[defined], kind="stable")]
    m = order.size
    scaled = p[order] * (m - np.arange(m))
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def mean_differences_against(
    y_true, scores: dict, reference, *, groups, n_boot: int, seed: int, level: float = 0.95
) -> dict:
    """For each named score set: its mean ROC AUC minus `reference`'s on the same images, with a paired
    patient-bootstrap interval and p-value (as compare_scores' "mean"); the reference's resamples are
    drawn once for all."""
    y_true, reference = check_scores(y_true, reference)
    base = mean_defined(roc_auc_per_label(y_true, reference))
    ref_means = None
    if n_boot > 0:
        _, ref_means = _mean_replicates(
            y_true, _replicates(y_true, reference, groups=groups, n_boot=n_boot, seed=seed)
        )
    result = {}
    for name, score in scores.items():
        _, score = check_scores(y_true, score)
        observed = mean_defined(roc_auc_per_label(y_true, score)) - base
        replicates = np.empty(0)
        if ref_means is not None:
            _, means = _mean_replicates(
                y_true, _replicates(y_true, score, groups=groups, n_boot=n_boot, seed=seed)
            )
            replicates = means - ref_means
        result[name] = _difference_entry(observed, replicates, level=level)
    return result
