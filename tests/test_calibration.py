"""heads.calibration: fitted on validation, applied by the same ops everywhere; the ECE it is judged by."""

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from cxr14.errors import InputError
from results.calibration import apply_calibration, fit_calibration
from results.metrics import expected_calibration_error, reliability_curve

NAMES = ("a", "b", "c")


def miscalibrated(*, n: int = 3000, seed: int = 0):
    """Labels and overconfident, shifted probabilities (what a head trained with a weighted loss gives)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(NAMES))) < 0.2).astype(np.float32)
    evidence = 3 * (y - 0.5) + rng.normal(0, 1.5, y.shape)
    return y, (1 / (1 + np.exp(-(2.5 * evidence + 1.0)))).astype(np.float32)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_fitted_on_one_half_lowers_the_error_on_the_other(method):
    y, p = miscalibrated()
    fitted = fit_calibration(y[:1500], p[:1500], method=method, label_names=NAMES)
    assert fitted["method"] == method and fitted["fitted_on"] == "val" and set(fitted["labels"]) == set(NAMES)
    before = expected_calibration_error(y[1500:], p[1500:])
    after = expected_calibration_error(y[1500:], apply_calibration(fitted, p[1500:], label_names=NAMES))
    assert (before > 0.1).all() and (after < 0.05).all(), (before, after)


def test_temperature_is_one_value_shared_by_every_label():
    y, p = miscalibrated()
    fitted = fit_calibration(y, p, method="temperature", label_names=NAMES)
    assert fitted["temperature"] > 1.5  # the probabilities were sharpened 2.5 times
    assert [v["a"] for v in fitted["labels"].values()] == pytest.approx([1 / fitted["temperature"]] * 3)
    assert all(v["b"] == 0 for v in fitted["labels"].values())


def test_isotonic_matches_scikit_learn_between_and_beyond_its_points():
    y, p = miscalibrated()
    fitted = fit_calibration(y, p, method="isotonic", label_names=NAMES)
    grid = np.linspace(0, 1, 501, dtype=np.float32)
    got = apply_calibration(fitted, np.stack([grid] * 3, axis=1), label_names=NAMES)
    for j in range(3):
        reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(
            p[:, j].astype(float), y[:, j]
        )
        np.testing.assert_allclose(got[:, j], reference.predict(grid), atol=2e-5)


def test_none_and_one_class_labels_keep_their_probabilities():
    y, p = miscalibrated(n=200)
    y[:, 1] = 0
    assert (
        apply_calibration(fit_calibration(y, p, method="none", label_names=NAMES), p, label_names=NAMES)
        is not p
    )
    np.testing.assert_array_equal(
        apply_calibration(fit_calibration(y, p, method="none", label_names=NAMES), p, label_names=NAMES), p
    )
    fitted = fit_calibration(y, p, method="platt", label_names=NAMES)
    assert fitted["labels"]["b"] == {"identity": True}
    out = apply_calibration(fitted, p, label_names=NAMES)
    np.testing.assert_array_equal(out[:, 1], p[:, 1])
    assert not np.allclose(out[:, 0], p[:, 0])
    np.testing.assert_array_equal(apply_calibration(None, p, label_names=NAMES), p)  # a run from before


def test_unknown_method_is_refused():
    y, p = miscalibrated(n=50)
    with pytest.raises(InputError, match="platt, isotonic, temperature, none"):
        fit_calibration(y, p, method="beta", label_names=NAMES)


def test_expected_calibration_error_by_hand():
    y = np.array([[1], [0], [1], [1]], dtype=float)
    p = np.array([[0.9], [0.8], [0.15], [0.05]])
    # Bins of 0.5: [0.05, 0.15] -> mean p 0.1, share positive 1.0; [0.8, 0.9] -> mean p 0.85, share 0.5.
    assert expected_calibration_error(y, p, bins=2)[0] == pytest.approx(0.5 * 0.9 + 0.5 * 0.35)
    curve = reliability_curve(y, p, bins=2)
    np.testing.assert_allclose(curve["mean_probability"], [0.1, 0.85])
    np.testing.assert_allclose(curve["positive_share"], [1.0, 0.5])
    assert list(curve["count"]) == [2, 2]
