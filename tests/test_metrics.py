import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr14.errors import InputError
from results.metrics import (
    _auc_of_weights,
    _label_incidence,
    bootstrap_auc,
    bootstrap_difference,
    label_metrics,
    mean_defined,
    pr_auc_per_label,
    roc_auc_per_label,
)


def weighted_roc_auc(y_true, y_score, weights):
    """One label's AUC under many weightings at once, through the machinery the bootstrap uses."""
    n_images = len(y_true)
    incidences = _label_incidence(
        np.asarray(y_true), np.asarray(y_score), units=np.arange(n_images), n_units=n_images
    )
    return _auc_of_weights(incidences, np.asarray(weights, dtype=np.float64))


def make_scores(*, images: int, labels: int, seed: int, ties: bool = False):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((images, labels)) < 0.3).astype(np.uint8)
    y_score = y_true * 0.6 + rng.random((images, labels))
    if ties:
        y_score = np.round(y_score, 1)
    return y_true, y_score


def clustered(*, patients: int, per_patient: int, seed: int):
    """Images of one patient share label and score: patient-level resampling must see fewer units."""
    rng = np.random.default_rng(seed)
    patient_label = rng.random(patients) < 0.5
    patient_score = patient_label * 0.5 + rng.random(patients)
    groups = np.repeat(np.arange(patients), per_patient)
    y_true = patient_label[groups].astype(np.uint8)[:, None]
    y_score = (patient_score[groups] + rng.normal(0, 0.01, groups.size))[:, None]
    return y_true, y_score, groups


def test_roc_auc_per_label_matches_sklearn_and_is_nan_for_one_class():
    y_true, y_score = make_scores(images=200, labels=3, seed=0, ties=True)
    y_true[:, 1] = 0
    aucs = roc_auc_per_label(y_true, y_score)
    assert aucs[0] == pytest.approx(roc_auc_score(y_true[:, 0], y_score[:, 0]))
    assert aucs[2] == pytest.approx(roc_auc_score(y_true[:, 2], y_score[:, 2]))
    assert math.isnan(aucs[1])
    y_true[:, 1] = 1
    assert math.isnan(roc_auc_per_label(y_true, y_score)[1])


def test_pr_auc_per_label_matches_sklearn_and_is_nan_without_positives():
    y_true, y_score = make_scores(images=200, labels=2, seed=1)
    y_true[:, 1] = 0
    pr = pr_auc_per_label(y_true, y_score)
    assert pr[0] == pytest.approx(average_precision_score(y_true[:, 0], y_score[:, 0]))
    assert math.isnan(pr[1])


def test_mean_defined_ignores_nan_and_is_nan_when_empty():
    assert mean_defined([0.6, np.nan, 0.8]) == pytest.approx(0.7)
    assert math.isnan(mean_defined([np.nan, np.nan]))
    assert math.isnan(mean_defined([]))


def test_weighted_auc_equals_sklearn_on_repeated_rows():
    y_true, y_score = make_scores(images=300, labels=1, seed=2, ties=True)
    weights = np.random.default_rng(3).integers(0, 4, size=(5, 300)).astype(np.float64)
    fast = weighted_roc_auc(y_true[:, 0], y_score[:, 0], weights)
    for r in range(5):
        repeat = weights[r].astype(int)
        expected = roc_auc_score(np.repeat(y_true[:, 0], repeat), np.repeat(y_score[:, 0], repeat))
        assert fast[r] == pytest.approx(expected, abs=1e-12)


def test_weighted_auc_counts_ties_across_classes_as_half():
    y_true = np.array([0, 1, 0, 1, 1, 0])
    y_score = np.array([0.5, 0.5, 0.5, 0.9, 0.1, 0.1])
    weights = np.array([[1.0] * 6, [2.0, 1.0, 0.0, 3.0, 1.0, 1.0]])
    fast = weighted_roc_auc(y_true, y_score, weights)
    assert fast[0] == pytest.approx(roc_auc_score(y_true, y_score))
    assert fast[1] == pytest.approx(roc_auc_score(y_true, y_score, sample_weight=weights[1]))
    assert weighted_roc_auc(y_true, np.zeros(6), weights)[0] == 0.5


def test_weighted_auc_is_nan_when_a_resample_has_one_class():
    y_true = np.array([0, 0, 1, 1])
    weights = np.array([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    auc = weighted_roc_auc(y_true, np.array([0.1, 0.2, 0.3, 0.4]), weights)
    assert math.isnan(auc[0]) and auc[1] == 1.0


def test_bootstrap_resamples_patients_not_images():
    y_true, y_score, groups = clustered(patients=40, per_patient=25, seed=0)
    by_patient = bootstrap_auc(y_true, y_score, groups=groups, n_boot=300, seed=0)
    by_image = bootstrap_auc(y_true, y_score, groups=np.arange(groups.size), n_boot=300, seed=0)
    patient_width = np.diff(by_patient["per_label"][0])[0]
    image_width = np.diff(by_image["per_label"][0])[0]
    # 40 independent units vs 1000 correlated ones: about sqrt(25) = 5 times wider.
    assert patient_width > 3 * image_width
    point = roc_auc_per_label(y_true, y_score)[0]
    assert by_patient["per_label"][0, 0] < point < by_patient["per_label"][0, 1]


def test_bootstrap_is_deterministic_by_seed():
    y_true, y_score = make_scores(images=150, labels=3, seed=4)
    groups = np.arange(150) // 3
    first = bootstrap_auc(y_true, y_score, groups=groups, n_boot=100, seed=7)
    again = bootstrap_auc(y_true, y_score, groups=groups, n_boot=100, seed=7)
    other = bootstrap_auc(y_true, y_score, groups=groups, n_boot=100, seed=8)
    np.testing.assert_array_equal(first["per_label"], again["per_label"])
    np.testing.assert_array_equal(first["mean"], again["mean"])
    assert not np.array_equal(first["per_label"], other["per_label"])


def test_bootstrap_interval_matches_a_plain_loop_over_patients():
    y_true, y_score = make_scores(images=90, labels=2, seed=5, ties=True)
    groups = np.arange(90) // 3
    result = bootstrap_auc(y_true, y_score, groups=groups, n_boot=50, seed=11, level=0.9)
    # Same draws as the implementation (one block of patient indices), AUCs via scikit-learn.
    draws = np.random.default_rng(11).integers(0, 30, size=(50, 30))
    aucs = []
    for row in draws:
        rows = np.concatenate([np.flatnonzero(groups == p) for p in row])
        aucs.append([roc_auc_score(y_true[rows, j], y_score[rows, j]) for j in range(2)])
    aucs = np.array(aucs)
    np.testing.assert_allclose(result["per_label"], np.quantile(aucs, [0.05, 0.95], axis=0).T)
    np.testing.assert_allclose(result["mean"], np.quantile(aucs.mean(axis=1), [0.05, 0.95]))


def test_bootstrap_skips_resamples_where_a_label_has_one_class():
    y_true, y_score = make_scores(images=200, labels=2, seed=6)
    groups = np.arange(200) // 4
    y_true[:, 1] = 0
    y_true[:4, 1] = 1  # one positive patient: absent from about a third of resamples
    result = bootstrap_auc(y_true, y_score, groups=groups, n_boot=200, seed=0)
    assert result["replicates"][0] == 200
    assert 100 < result["replicates"][1] < 170
    assert result["mean_replicates"] == result["replicates"][1]
    assert np.isfinite(result["per_label"]).all()


def test_bootstrap_leaves_a_label_undefined_on_the_full_data_as_nan():
    y_true, y_score = make_scores(images=100, labels=2, seed=7)
    y_true[:, 1] = 0
    result = bootstrap_auc(y_true, y_score, groups=np.arange(100), n_boot=50, seed=0)
    assert np.isnan(result["per_label"][1]).all()
    assert np.isfinite(result["per_label"][0]).all() and np.isfinite(result["mean"]).all()


def test_evaluate_reports_undefined_label_as_null_and_keeps_it():
    names = ("Atelectasis", "Hernia", "Mass")
    y_true, y_score = make_scores(images=120, labels=3, seed=8)
    y_true[:, 1] = 0
    result = label_metrics(y_true, y_score, groups=np.arange(120) // 2, label_names=names, n_boot=50, seed=0)
    text = json.dumps(result, allow_nan=False)  # JSON-ready: no NaN anywhere
    back = json.loads(text)
    hernia = back["labels"]["Hernia"]
    assert hernia == {"auc": None, "ci": [None, None], "pr_auc": None, "positives": 0, "negatives": 120,
                      "defined": False}  # fmt: skip
    assert back["undefined"] == ["Hernia"]
    aucs = roc_auc_per_label(y_true, y_score)
    assert back["mean_auc"] == pytest.approx((aucs[0] + aucs[2]) / 2)
    assert back["labels"]["Mass"]["auc"] == pytest.approx(aucs[2])
    assert back["labels"]["Mass"]["defined"] is True
    lo, hi = back["labels"]["Mass"]["ci"]
    assert lo < back["labels"]["Mass"]["auc"] < hi
    assert back["images"] == 120 and back["patients"] == 60
    assert back["labels"]["Atelectasis"]["positives"] == int(y_true[:, 0].sum())


def test_evaluate_without_bootstrap_leaves_intervals_empty():
    y_true, y_score = make_scores(images=50, labels=2, seed=9)
    result = label_metrics(y_true, y_score, groups=np.arange(50), label_names=("a", "b"), n_boot=0, seed=0)
    assert result["mean_ci"] == [None, None]
    assert result["labels"]["a"]["ci"] == [None, None] and result["labels"]["a"]["auc"] is not None


@pytest.mark.parametrize(
    ("y_true", "y_score", "groups", "message"),
    [
        (np.zeros((4, 2)), np.zeros((4, 3)), np.arange(4), "one shape"),
        (np.full((4, 2), 2), np.zeros((4, 2)), np.arange(4), "0 or 1"),
        (np.zeros((4, 2)), np.full((4, 2), np.nan), np.arange(4), "NaN"),
        (np.zeros((4, 2)), np.zeros((4, 2)), np.arange(3), "one patient per image"),
        (np.zeros((0, 2)), np.zeros((0, 2)), np.arange(0), "empty"),
    ],
)
def test_bad_input_is_an_input_error(y_true, y_score, groups, message):
    with pytest.raises(InputError, match=message):
        label_metrics(y_true, y_score, groups=groups, label_names=("a", "b"), n_boot=10, seed=0)


def test_paired_difference_is_zero_for_equal_scores_and_tight_for_a_small_shift():
    y_true, y_score = make_scores(images=400, labels=3, seed=5)
    groups = np.arange(400) // 2
    same = bootstrap_difference(y_true, y_score, y_score.copy(), groups=groups, n_boot=200, seed=1)
    assert same["difference"] == 0.0 and same["ci"] == [0.0, 0.0]
    noisy = y_score + np.random.default_rng(0).normal(0, 0.3, y_score.shape)
    result = bootstrap_difference(y_true, y_score, noisy, groups=groups, n_boot=300, seed=1)
    expected = np.mean(
        [
            roc_auc_score(y_true[:, j], y_score[:, j]) - roc_auc_score(y_true[:, j], noisy[:, j])
            for j in range(3)
        ]
    )
    assert result["difference"] == pytest.approx(expected)
    low, high = result["ci"]
    assert 0 < low < result["difference"] < high
    # Paired: narrower than the difference of two independent resamplings would be.
    a = bootstrap_auc(y_true, y_score, groups=groups, n_boot=300, seed=1)["mean"]
    b = bootstrap_auc(y_true, noisy, groups=groups, n_boot=300, seed=2)["mean"]
    assert high - low < np.hypot(a[1] - a[0], b[1] - b[0])
