"""bench.tokens: on a tiny cache over a tinier budget, the figures are produced, consistent and streamed."""

import numpy as np

from bench.tokens import BACKBONE, bench_tokens, format_bench_tokens, kept_token_cache, write_token_cache
from cache.store import cache_path, read_features
from heads.settings import HeadConfig

HEAD = HeadConfig(kind="attention", units=(8,), dropout=0.0, transition=8)


def test_the_planted_token_cache_holds_each_finding_in_one_token(tmp_path):
    written = write_token_cache(cache_dir=tmp_path, rows=200, tokens=9, channels=8, seed=0)
    stored = read_features(cache_path(tmp_path, BACKBONE))
    assert stored.features.shape == (200, 9, 8) and stored.attrs["kind"] == "tokens"
    assert written["bytes"] == stored.features.nbytes


def test_a_cache_of_the_same_recipe_is_kept_and_any_other_is_not(tmp_path):
    shape = {"rows": 120, "tokens": 4, "channels": 6, "seed": 0}
    assert kept_token_cache(tmp_path, **shape) is None  # nothing there yet
    written = write_token_cache(cache_dir=tmp_path, **shape)
    kept = kept_token_cache(tmp_path, **shape)
    assert kept["seconds"] == "kept" and kept["bytes"] == written["bytes"] and kept["path"] == written["path"]
    for other in ({"seed": 1}, {"channels": 5}, {"rows": 121}):
        assert kept_token_cache(tmp_path, **shape | other) is None
    cache_path(tmp_path, BACKBONE).write_bytes(b"not HDF5")  # damaged: written again, not read
    assert kept_token_cache(tmp_path, **shape) is None


def test_the_bench_streams_a_cache_over_its_budget_and_reports_its_figures(tmp_path):
    # A budget of 10 kB below a 58 kB cache; the machine's page cache is left alone.
    result = bench_tokens(rows=400, tokens=9, channels=8, budget_gb=1e-5, workdir=tmp_path, head=HEAD,
                          drop_cache=False)  # fmt: skip
    assert 400 * 9 * 8 * 2 > result["budget_gb"] * 1e9 and result["cache_gb"] == 0.0  # 58 kB, in GB
    assert result["train_rows"] + result["val_rows"] < 400 and result["epoch_s"] > 0
    assert np.isclose(result["epoch_over_read"], result["epoch_s"] / max(result["read_s"], 1e-3), atol=0.01)
    assert len(result["reads_s"]) == 3 and result["read_s"] == np.median(result["reads_s"])
    assert result["streamed_over_memory"] > 0 and result["memory_epoch_s"] > 0
    assert result["baseline_mb"] <= result["peak_mb"] and result["page_cache"].startswith("not dropped")
    text = format_bench_tokens(result)
    assert "streamed" in text and "epoch / read" in text and "limit" in text


def test_streamed_only_skips_the_loaded_whole_run_and_still_reports(tmp_path):
    result = bench_tokens(rows=200, tokens=9, channels=8, budget_gb=1e-5, workdir=tmp_path, head=HEAD,
                          memory=False, drop_cache=False)  # fmt: skip
    assert not any(key.startswith("memory_") for key in result) and "streamed_over_memory" not in result
    assert result["peak_mb"] > 0 and result["epoch_s"] > 0
    text = format_bench_tokens(result)
    assert "loaded whole" not in text and "peak memory" in text
    again = bench_tokens(rows=200, tokens=9, channels=8, budget_gb=1e-5, workdir=tmp_path, head=HEAD,
                         memory=False, drop_cache=False)  # fmt: skip
    assert again["write_s"] == "kept" and "kept from an earlier run" in format_bench_tokens(again)
