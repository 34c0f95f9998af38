"""Head quality on small planted problems: every default head matches or beats the ridge probe where it
should (bench.heads.bench_quality, the code behind `run.py bench heads --quality`)."""

from pathlib import Path

import pytest

from bench.heads import bench_quality
from experiments.config import load_config

DEFAULTS = load_config(Path(__file__).resolve().parents[1] / "cxr14.toml")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    runs = bench_quality(
        config=DEFAULTS, rows=6000, dim=64, workdir=tmp_path_factory.mktemp("quality"), seed=0
    )["runs"]
    return {(r["problem"], r["head"], r["caches"]): r for r in runs}


def test_linear_head_is_the_tuned_probe(results):
    run = results[("linear", "linear", "A")]
    assert run["difference"] >= -0.005 and run["best_epoch"] == 0


def test_fc_matches_the_probe_on_a_linear_signal(results):
    assert results[("linear", "fc", "A")]["difference"] >= -0.005
    assert results[("complementary", "fc", "A")]["difference"] >= -0.005
    assert results[("complementary", "fc", "B")]["difference"] >= -0.005


def test_fc_beats_the_probe_on_a_spread_signal(results):
    run = results[("nonlinear", "fc", "A")]
    assert run["directions"] > 0
    assert run["difference"] >= 0.03 and run["difference_ci"][0] > 0, run


def test_ensemble_of_complementary_caches_pays_off(results):
    ensemble = results[("complementary", "ensemble", "A+B")]
    best_single = max(results[("complementary", "fc", c)]["test_mean_auc"] for c in ("A", "B"))
    assert ensemble["test_mean_auc"] >= best_single + 0.02
    assert ensemble["difference"] >= -0.01  # its reference is the probe on both caches concatenated


def test_metadata_head_matches_the_probe_with_metadata(results):
    assert results[("metadata", "fc", "A+metadata")]["difference"] >= -0.005


def test_token_heads_on_the_local_problem_are_no_worse_than_the_probe(results):
    # The probe is fitted on the mean of the tokens, which is cache A: the same reference as fc's on A.
    probe = results[("local", "linear", "A")]["reference_mean_auc"]
    for kind in ("attention", "attentive"):
        run = results[("local", kind, "M")]
        assert run["reference_mean_auc"] == pytest.approx(probe, abs=2e-3)
        assert run["difference"] >= -0.005, run


def test_token_heads_see_what_pooling_dilutes(results):
    """The local problem's findings sit in one token of 16: the attentions, started where the probe sees
    findings, gain beyond noise; fc on the pooled vector cannot."""
    fc = results[("local", "fc", "A")]
    for kind in ("attention", "attentive"):
        run = results[("local", kind, "M")]
        assert run["difference"] >= 0.03 and run["difference_ci"][0] > 0, run
        assert run["test_mean_auc"] >= fc["test_mean_auc"] + 0.02, (run, fc)
