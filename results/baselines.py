"""What a head must beat: a metadata-only baseline (age, sex and view position, no pixels) and chance.

On the official split a view-position-only probe already reaches ~0.59 mean AUC: sicker patients are
filmed AP in bed. An image head is read against that, on the same rows and the same patient resamples.
"""

from collections.abc import Sequence

import numpy as np

from results.logistic import fit_logistic, predict_logistic
from results.metrics import bootstrap_difference, label_metrics

CHANCE_AUC = 0.5


def metadata_baseline_scores(
    covariates: np.ndarray, labels: np.ndarray, *, train_rows: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """(len(rows), L) probabilities of one logistic regression per label on the metadata columns
    (heads.data.METADATA_COLUMNS, L2 penalty as scikit-learn's default), fitted on `train_rows`; a label
    with one class in train scores its training prevalence."""
    y = labels[train_rows]
    both = y.min(axis=0) < y.max(axis=0)
    scores = np.empty((len(rows), labels.shape[1]))
    scores[:, ~both] = y.mean(axis=0)[~both]
    if both.any():
        weights = fit_logistic(covariates[train_rows], y[:, both], ridge=1.0)
        scores[:, both] = predict_logistic(covariates[rows], weights)
    return scores


def baseline_metrics(
    y_true,
    run_scores,
    baseline_scores,
    *,
    groups,
    label_names: Sequence[str],
    n_boot: int,
    seed: int,
) -> dict:
    """The metadata baseline's AUCs (its mean interval from the same patient resamples as the run's), the
    run minus the baseline with a paired interval, whether the run beats it, and the chance line; JSON-ready.

    "Beats" means the paired 95% interval of the difference lies above 0 (without a bootstrap: the
    difference is above 0).
    """
    # Per-label baseline AUCs without their own bootstrap: the paired one below gives the mean's interval.
    metadata = label_metrics(
        y_true, baseline_scores, groups=groups, label_names=label_names, n_boot=0, seed=seed
    )
    paired = bootstrap_difference(
        y_true, run_scores, baseline_scores, groups=groups, n_boot=n_boot, seed=seed
    )
    low = paired["ci"][0] if paired["ci"][0] is not None else paired["difference"]
    return {
        "metadata": {
            "model": "logistic regression per label on age, sex and view position, fitted on train",
            "mean_auc": metadata["mean_auc"],
            "mean_ci": paired["mean_ci_b"],
            "labels": {name: {"auc": metadata["labels"][name]["auc"]} for name in label_names},
        },
        "chance_auc": CHANCE_AUC,
        "run_minus_metadata": {"difference": paired["difference"], "ci": paired["ci"]},
        "beats_metadata": bool(low is not None and low > 0),
    }
