"""A run's results record: written and read in one place, versioned, every bad field one line."""

import json

import pytest

from cxr14.errors import InputError
from results.record import RESULTS_VERSION, read_results, results_from, write_results
from tests.fixtures import refused_results


def _metrics(**changes) -> dict:
    metrics = {
        "split": "test",
        "images": 40,
        "mean_auc": 0.75,
        "mean_ci": [0.7, 0.8],
        "labels": {
            "Atelectasis": {"auc": 0.75, "ci": [0.7, 0.8], "positives": 10, "negatives": 30},
            "Hernia": {"auc": None, "ci": [None, None], "positives": 0, "negatives": 40},
        },
        "run": "fc-x",
        "reference": {"difference": 0.01, "difference_ci": [-0.01, 0.03]},
    }
    return {**metrics, **changes}


def test_results_round_trip_with_their_version(tmp_path):
    path = write_results(tmp_path / "metrics.json", _metrics())
    raw = json.loads(path.read_text())
    assert raw["results_version"] == RESULTS_VERSION
    results = read_results(path)
    assert results.mean_auc == 0.75 and results.mean_ci == (0.7, 0.8) and results.images == 40
    assert results.labels["Atelectasis"].positives == 10 and results.labels["Hernia"].auc is None
    assert results.details["reference"]["difference"] == 0.01
    assert read_results(write_results(tmp_path / "again.json", results.as_dict())) == results


def test_a_file_written_before_versions_is_read_as_version_one(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics()))
    assert read_results(tmp_path / "metrics.json").split == "test"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"results_version": 99}, "results_version 99"),
        ({"mean_auc": "high"}, "mean_auc = 'high' is not an AUC"),
        ({"mean_auc": 1.5}, "mean_auc = 1.5 is not an AUC"),
        ({"mean_ci": [0.1]}, "mean_ci = \\[0.1\\] is not an interval"),
        ({"images": -1}, "images = -1 is not a count"),
        ({"labels": {"Atelectasis": {"ci": [0, 1]}}}, "labels.Atelectasis must hold"),
    ],
)
def test_a_bad_field_is_one_line_naming_the_file_and_key(tmp_path, changes, message):
    refused_results(tmp_path / "metrics.json", _metrics(**changes), match=message)


def test_a_missing_key_or_a_file_that_is_not_json_is_one_line(tmp_path):
    metrics = _metrics()
    del metrics["labels"]
    with pytest.raises(InputError, match="no per-label results"):
        results_from(metrics, source="x.json")
    (tmp_path / "metrics.json").write_text('{"split": "te')
    with pytest.raises(InputError, match="cannot be read as JSON"):
        read_results(tmp_path / "metrics.json")
    with pytest.raises(InputError, match="no results"):
        read_results(tmp_path / "absent.json")


def test_a_rounding_step_above_one_reads_as_one(tmp_path):
    metrics = _metrics()
    metrics["labels"]["Atelectasis"]["pr_auc"] = 1.0000000000000002
    results = read_results(write_results(tmp_path / "metrics.json", metrics))
    assert results.labels["Atelectasis"].pr_auc == 1.0
