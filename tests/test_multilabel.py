"""results.multilabel: multi-label metrics at a run's operating points, their patient-bootstrap intervals,
and the block metrics.json and auc.md carry (results.record, results.report)."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    coverage_error,
    f1_score,
    hamming_loss,
    label_ranking_average_precision_score,
)

from cxr14.errors import InputError
from dataset.settings import LABELS
from results.multilabel import multilabel_metrics, per_image_terms, ratios
from results.record import MULTILABEL_METRICS, read_results, write_results
from tests.fixtures import make_index, refused_results, signal_data, train_quickly

# Four films, three labels; the third label has no threshold (one class in validation) and is left out.
Y = np.array([[0, 0, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
P = np.array([[0.1, 0.2, 0.9], [0.5, 0.7, 0.5], [0.2, 0.8, 0.1], [0.3, 0.6, 0.1]])
CUTS = np.array([0.5, 0.5, np.nan])
NAMES = ["a", "b", "c"]


def _sklearn(y, calls, scores, weights=None) -> dict:
    findings = y.any(axis=1)
    w = None if weights is None else weights[findings]
    return {
        "hamming_loss": hamming_loss(y, calls, sample_weight=weights),
        "subset_accuracy": accuracy_score(y, calls, sample_weight=weights),
        "f1_samples": f1_score(y, calls, average="samples", zero_division=0, sample_weight=weights),
        "f1_macro": f1_score(y, calls, average="macro", zero_division=0, sample_weight=weights),
        "lrap": label_ranking_average_precision_score(y[findings], scores[findings], sample_weight=w),
        "coverage_error": coverage_error(y[findings], scores[findings], sample_weight=w),
    }


def _values(block: dict) -> dict:
    return {name: entry["value"] for name, entry in block["metrics"].items()}


def test_values_are_scikit_learns_on_the_labels_with_a_threshold():
    block = multilabel_metrics(Y, P, CUTS, groups=np.arange(4), label_names=NAMES, n_boot=0, seed=0)
    y, scores = Y[:, :2], P[:, :2]
    calls = (scores >= 0.5).astype(int)  # [[0,0], [1,1], [0,1], [0,1]]
    assert _values(block) == pytest.approx(_sklearn(y, calls, scores))
    # By hand: 3 wrong cells of 8; only film 0 is exactly right; example F1 0 (film 0: no finding, no
    # call), 2/3, 2/3, 0; macro F1 of a (2/3) and b (1/2).
    assert block["metrics"]["hamming_loss"]["value"] == pytest.approx(3 / 8)
    assert block["metrics"]["subset_accuracy"]["value"] == pytest.approx(1 / 4)
    assert block["metrics"]["f1_samples"]["value"] == pytest.approx((0 + 2 / 3 + 2 / 3 + 0) / 4)
    assert block["metrics"]["f1_macro"]["value"] == pytest.approx(7 / 12)
    # Ranking on films 1 and 2 only (the others have no finding among a, b): 1/2 and 1; coverage 2 and 2.
    assert block["metrics"]["lrap"]["value"] == pytest.approx(0.75)
    assert block["metrics"]["coverage_error"]["value"] == pytest.approx(2.0)
    assert block["labels"] == ["a", "b"] and block["without_threshold"] == ["c"]
    assert (block["images"], block["images_with_findings"], block["empty_images"]) == (4, 2, 1)
    assert all(entry["ci"] == [None, None] for entry in block["metrics"].values())  # n_boot=0


def test_a_resample_is_scikit_learn_with_each_image_weighted_by_its_patients_draws():
    rng = np.random.default_rng(1)
    y = (rng.random((300, 5)) < 0.2).astype(np.int8)
    scores = np.round(y * 0.3 + rng.random((300, 5)), 1)  # ties: ranks must break them as scikit-learn does
    calls = (scores >= 0.6).astype(np.int8)
    weights = rng.integers(0, 4, 300).astype(np.float64)
    resampled = ratios(weights @ per_image_terms(y, calls, scores), 5)
    expected = _sklearn(y, calls, scores, weights)
    assert {name: value[0] for name, value in resampled.items()} == pytest.approx(expected)


def _problem(patients: int, *, seed: int):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(patients), 3)
    y = (rng.random((groups.size, 6)) < 0.15).astype(np.int8)
    return y, np.clip(y * 0.3 + rng.random(y.shape) * 0.7, 0, 1), groups


def test_intervals_hold_the_value_and_narrow_with_more_patients():
    widths = []
    for patients in (100, 1600):
        y, scores, groups = _problem(patients, seed=patients)
        block = multilabel_metrics(
            y, scores, np.full(6, 0.5), groups=groups, label_names=list("abcdef"), n_boot=300, seed=0
        )
        for name, entry in block["metrics"].items():
            low, high = entry["ci"]
            assert low <= entry["value"] <= high, name
        widths.append({name: e["ci"][1] - e["ci"][0] for name, e in block["metrics"].items()})
    for name in MULTILABEL_METRICS:  # 16x the patients: about a quarter of the width
        assert widths[1][name] < 0.5 * widths[0][name], name


def test_intervals_resample_patients_not_images():
    y, scores, groups = _problem(200, seed=3)
    y, scores = np.repeat(y[::3], 3, axis=0), np.repeat(scores[::3], 3, axis=0)  # a patient's films agree
    common = {"label_names": list("abcdef"), "n_boot": 300, "seed": 0}
    by_patient = multilabel_metrics(y, scores, np.full(6, 0.5), groups=groups, **common)
    by_image = multilabel_metrics(y, scores, np.full(6, 0.5), groups=np.arange(len(y)), **common)
    ci, naive = by_patient["metrics"]["hamming_loss"]["ci"], by_image["metrics"]["hamming_loss"]["ci"]
    assert ci[1] - ci[0] > 1.4 * (naive[1] - naive[0])  # three correlated films are one unit, not three


def test_without_any_threshold_every_metric_is_undefined():
    block = multilabel_metrics(
        Y, P, np.full(3, np.nan), groups=np.arange(4), label_names=NAMES, n_boot=20, seed=0
    )
    assert block["labels"] == [] and all(e["value"] is None for e in block["metrics"].values())


def test_thresholds_that_do_not_match_the_labels_are_refused():
    with pytest.raises(InputError, match="2 thresholds and 3 label names for 3 label columns"):
        multilabel_metrics(Y, P, CUTS[:2], groups=np.arange(4), label_names=NAMES, n_boot=0, seed=0)


def _record(**block_changes) -> dict:
    block = multilabel_metrics(Y, P, CUTS, groups=np.arange(4), label_names=NAMES, n_boot=50, seed=0)
    return {
        "split": "test",
        "images": 4,
        "mean_auc": 0.7,
        "mean_ci": [0.6, 0.8],
        "labels": {"a": {"auc": 0.7, "ci": [0.6, 0.8], "positives": 2, "negatives": 2}},
        "multilabel": {**block, **block_changes},
    }


def test_the_block_round_trips_and_an_older_file_without_it_still_reads(tmp_path):
    results = read_results(write_results(tmp_path / "metrics.json", _record()))
    assert results.multilabel.labels == ("a", "b")
    assert results.multilabel.metrics["lrap"].value == pytest.approx(0.75)
    assert results.multilabel.details["empty_images"] == 1
    assert read_results(write_results(tmp_path / "again.json", results.as_dict())) == results
    older = _record()
    del older["multilabel"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert read_results(tmp_path / "older.json").multilabel is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"metrics": {}}, "multilabel.metrics.hamming_loss must hold its 'value'"),
        ({"labels": "a"}, "multilabel.labels = 'a' is not a list"),
        (
            {"metrics": {name: {"value": 1.5, "ci": [0, 1]} for name in MULTILABEL_METRICS}},
            "multilabel.metrics.hamming_loss.value = 1.5 is not a number in \\[0, 1\\]",
        ),
        (
            {"metrics": {name: {"value": 0.5, "ci": [0.1]} for name in MULTILABEL_METRICS}},
            "multilabel.metrics.hamming_loss.ci = \\[0.1\\] is not an interval",
        ),
    ],
)
def test_a_bad_block_is_one_line_naming_the_key(tmp_path, changes, message):
    refused_results(tmp_path / "metrics.json", _record(**changes), match=message)


def test_a_trained_run_writes_the_block_into_metrics_json_and_auc_md(tmp_path):
    data = signal_data(tmp_path, make_index(240), dim=16)
    metrics = train_quickly(tmp_path / "run", data)
    block = read_results(tmp_path / "run" / "metrics.json").multilabel
    thresholds = json.loads((tmp_path / "run" / "thresholds.json").read_text())
    with_threshold = [name for name in LABELS if thresholds["labels"][name]["threshold"] is not None]
    assert block.labels == tuple(with_threshold)
    assert block.details["operating_point"]["method"] == thresholds["method"] == "youden"
    assert block.details["images"] == metrics["images"] and block.details["n_boot"] == metrics["n_boot"]
    for name, estimate in block.metrics.items():
        assert estimate.value is not None and not math.isnan(estimate.value), name
        assert estimate.ci[0] <= estimate.value <= estimate.ci[1], name
    text = (tmp_path / "run" / "auc.md").read_text()
    section = text[text.index("## Multi-label metrics at the operating points") :]
    for title, _ in MULTILABEL_METRICS.values():
        assert title in section
    assert f"on {metrics['images']} images and {len(with_threshold)} labels" in section
