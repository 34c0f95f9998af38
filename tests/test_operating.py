"""heads.operating and results.metrics.rates_at_thresholds: thresholds chosen on validation, the calls they
make, and sensitivity/specificity/PPV/NPV with patient-bootstrap intervals."""

import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_curve

from cxr14.errors import InputError
from results.metrics import rates_at_thresholds
from results.operating import NO_CALL, call_names, caller, choose_thresholds

NAMES = ("a", "b")


def scores(*, n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.3).astype(np.int8)
    return y, np.clip(0.35 * y + 0.65 * rng.random((n, 2)), 0, 1).astype(np.float32)


def _rates(y, p, threshold):
    called = p >= threshold
    tp, fp = (called & (y == 1)).sum(), (called & (y == 0)).sum()
    tn, fn = (~called & (y == 0)).sum(), (~called & (y == 1)).sum()
    return tp / (tp + fn), tn / (tn + fp)


def test_youden_threshold_maximises_sensitivity_plus_specificity():
    y, p = scores()
    chosen = choose_thresholds(y, p, method="youden", target=0.9, label_names=NAMES)
    assert chosen["method"] == "youden" and chosen["target"] is None and chosen["fitted_on"] == "val"
    for j, name in enumerate(NAMES):
        fpr, tpr, _ = roc_curve(y[:, j], p[:, j])
        point = chosen["labels"][name]
        sensitivity, specificity = _rates(y[:, j], p[:, j], point["threshold"])
        assert sensitivity + specificity - 1 == pytest.approx((tpr - fpr).max())
        assert (point["sensitivity"], point["specificity"]) == pytest.approx((sensitivity, specificity))


@pytest.mark.parametrize("target", [0.8, 0.95])
def test_target_sensitivity_and_specificity_are_reached_and_no_more_is_given_up(target):
    y, p = scores()
    by_sensitivity = choose_thresholds(y, p, method="sensitivity", target=target, label_names=NAMES)
    by_specificity = choose_thresholds(y, p, method="specificity", target=target, label_names=NAMES)
    for j, name in enumerate(NAMES):
        t = by_sensitivity["labels"][name]["threshold"]
        assert _rates(y[:, j], p[:, j], t)[0] >= target
        # The next higher score as threshold would miss the target: this is the highest that reaches it.
        higher = p[:, j][p[:, j] > t].min()
        assert _rates(y[:, j], p[:, j], higher)[0] < target
        t = by_specificity["labels"][name]["threshold"]
        assert _rates(y[:, j], p[:, j], t)[1] >= target
        lower = p[:, j][p[:, j] < t].max()
        assert _rates(y[:, j], p[:, j], lower)[1] < target


def test_one_class_label_has_no_threshold_and_no_call():
    y, p = scores(n=100)
    y[:, 1] = 0
    chosen = choose_thresholds(y, p, method="youden", target=0.9, label_names=NAMES)
    assert chosen["labels"]["b"]["threshold"] is None
    calls = caller(chosen, label_names=NAMES)(tf.constant(p)).numpy()
    assert set(calls[:, 1]) == {NO_CALL}
    np.testing.assert_array_equal(calls[:, 0], (p[:, 0] >= chosen["labels"]["a"]["threshold"]).astype(int))
    assert call_names(calls[0])[1] is None and call_names(np.array([1, 0])) == ["positive", "negative"]
    with pytest.raises(InputError, match="youden, sensitivity, specificity"):
        choose_thresholds(y, p, method="f1", target=0.9, label_names=NAMES)


def test_specificity_beyond_reach_calls_nothing_positive():
    y = np.array([[1], [0], [1], [0]])
    p = np.array([[0.9], [0.9], [0.2], [0.2]], dtype=np.float32)
    chosen = choose_thresholds(y, p, method="specificity", target=1.0, label_names=("a",))
    assert chosen["labels"]["a"]["threshold"] > 0.9 and chosen["labels"]["a"]["specificity"] == 1.0


def test_rates_and_their_patient_bootstrap_intervals():
    y, p = scores()
    groups = np.arange(len(y)) // 3
    result = rates_at_thresholds(y, p, [0.5, np.nan], groups=groups, label_names=NAMES, n_boot=300, seed=0)
    a = result["a"]
    called = p[:, 0] >= 0.5
    tp, fp = int((called & (y[:, 0] == 1)).sum()), int((called & (y[:, 0] == 0)).sum())
    tn, fn = int((~called & (y[:, 0] == 0)).sum()), int((~called & (y[:, 0] == 1)).sum())
    assert (a["tp"], a["fp"], a["tn"], a["fn"]) == (tp, fp, tn, fn)
    expected = {
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "ppv": tp / (tp + fp),
        "npv": tn / (tn + fn),
    }
    for rate, value in expected.items():
        assert a[rate]["value"] == pytest.approx(value)
        low, high = a[rate]["ci"]
        assert low < value < high and high - low < 0.25
    assert result["b"]["threshold"] is None and result["b"]["ppv"] == {"value": None, "ci": [None, None]}
    again = rates_at_thresholds(y, p, [0.5, np.nan], groups=groups, label_names=NAMES, n_boot=300, seed=0)
    assert again == result  # seeded
    no_boot = rates_at_thresholds(y, p, [0.5, 0.5], groups=groups, label_names=NAMES, n_boot=0, seed=0)
    assert no_boot["a"]["sensitivity"]["ci"] == [None, None]
