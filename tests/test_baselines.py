"""heads.baselines: the metadata-only baseline is fitted on train, scored on the same rows and the same
patient resamples as the run, and a run that does not beat it is flagged."""

import numpy as np
import pytest

from heads.data import encode_metadata
from results.baselines import baseline_metrics, metadata_baseline_scores
from results.metrics import label_metrics

NAMES = ("view-driven", "age-driven", "noise")


@pytest.fixture(scope="module")
def rows():
    """1,200 images of 400 patients: one label follows the view position, one the age, one nothing."""
    rng = np.random.default_rng(0)
    n = 1200
    view = np.where(rng.random(n) < 0.4, "AP", "PA").astype(object)
    age = rng.uniform(20, 90, n).astype(np.float32)
    sex = np.where(rng.random(n) < 0.5, "M", "F").astype(object)
    labels = np.stack(
        [
            (view == "AP") & (rng.random(n) < 0.6) | (rng.random(n) < 0.05),
            rng.random(n) < (age - 10) / 100,
            rng.random(n) < 0.2,
        ],
        axis=1,
    ).astype(np.float32)
    covariates = encode_metadata(age=age, sex=sex, view=view, fill_age=50.0)
    return covariates, labels, np.arange(n) // 3


def test_metadata_baseline_learns_metadata_on_train_and_only_that(rows):
    covariates, labels, groups = rows
    train, test = np.arange(0, 900), np.arange(900, 1200)
    scores = metadata_baseline_scores(covariates, labels, train_rows=train, rows=test)
    assert scores.shape == (300, 3)
    metrics = label_metrics(labels[test], scores, groups=groups[test], label_names=NAMES, n_boot=0, seed=0)
    assert metrics["labels"]["view-driven"]["auc"] > 0.75
    assert metrics["labels"]["age-driven"]["auc"] > 0.6
    assert abs(metrics["labels"]["noise"]["auc"] - 0.5) < 0.12
    # Fitted on train only: changing the test rows' labels changes nothing.
    shuffled = labels.copy()
    shuffled[test] = shuffled[test][::-1]
    again = metadata_baseline_scores(covariates, shuffled, train_rows=train, rows=test)
    np.testing.assert_array_equal(again, scores)


def test_one_class_label_in_train_scores_its_prevalence(rows):
    covariates, labels, _ = rows
    labels = labels.copy()
    labels[:900, 2] = 0
    scores = metadata_baseline_scores(
        covariates, labels, train_rows=np.arange(900), rows=np.arange(900, 1000)
    )
    assert set(scores[:, 2]) == {0.0}


def test_a_run_that_does_not_beat_the_metadata_baseline_is_flagged(rows):
    covariates, labels, groups = rows
    train, test = np.arange(0, 900), np.arange(900, 1200)
    baseline = metadata_baseline_scores(covariates, labels, train_rows=train, rows=test)
    rng = np.random.default_rng(1)
    common = {"groups": groups[test], "label_names": NAMES, "n_boot": 200, "seed": 0}
    weak = baseline_metrics(labels[test], rng.random((300, 3)), baseline, **common)
    assert weak["beats_metadata"] is False and weak["run_minus_metadata"]["difference"] < 0
    assert weak["chance_auc"] == 0.5
    strong_scores = labels[test] * 0.6 + rng.random((300, 3)) * 0.4
    strong = baseline_metrics(labels[test], strong_scores, baseline, **common)
    assert strong["beats_metadata"] is True
    low, high = strong["run_minus_metadata"]["ci"]
    assert 0 < low < strong["run_minus_metadata"]["difference"] < high
    # The baseline's own interval comes from the same bootstrap as the run's would.
    own = label_metrics(labels[test], baseline, **common)
    assert strong["metadata"]["mean_ci"] == own["mean_ci"]
    assert strong["metadata"]["labels"]["noise"]["auc"] == own["labels"]["noise"]["auc"]
