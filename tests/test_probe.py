"""heads.probe: the penalty search's rank AUC is scikit-learn's ROC AUC, ties and one-class labels too."""

import numpy as np
from sklearn.metrics import roc_auc_score

from heads.probe import rank_auc_per_label


def test_rank_auc_matches_scikit_learn_with_ties_and_one_class_labels():
    rng = np.random.default_rng(0)
    n = 3000
    labels = (rng.random((n, 6)) < [0.02, 0.1, 0.5, 0.9, 0.0, 1.0]).astype(np.float32)
    scores = rng.normal(size=(n, 6)).astype(np.float32) + labels
    scores[:, 1] = np.round(scores[:, 1], 1)  # many tied scores, across both classes
    scores[:, 2] = rng.integers(0, 3, n)  # three distinct scores only
    scores[:, 3] = 1.0  # every score tied: AUC 0.5
    got = rank_auc_per_label(labels, scores)
    for j in range(4):
        assert abs(got[j] - roc_auc_score(labels[:, j], scores[:, j].astype(np.float64))) < 1e-12
    assert got[3] == 0.5
    assert np.isnan(got[4]) and np.isnan(got[5])  # no positive; no negative
