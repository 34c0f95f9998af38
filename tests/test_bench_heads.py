"""bench.heads: the figures are produced and consistent, and the FLOP count matches a hand count."""

import numpy as np
import pytest
import tensorflow as tf

import run
from bench.heads import (
    BACKBONE,
    QUALITY_RUNS,
    _product_step,
    bench_heads,
    format_bench_heads,
    only_problems,
    training_flops,
    write_bench_cache,
)
from bench.planted import PROBLEMS, planted_index
from cache.store import cache_path, read_features
from cxr14.errors import InputError
from dataset.settings import LABELS
from heads.models import build_head
from heads.settings import HeadConfig


def test_training_flops_by_hand():
    head = HeadConfig(kind="fc", units=(8, 4))
    model = build_head(kind="fc", inputs={"bb": (16,)}, n_labels=14, head=head, seed=0)
    # forward + weight gradient for the first layer (its input needs no gradient), x3 for the others
    per_example = 2 * 16 * 8 * 2 + 2 * 8 * 4 * 3 + 2 * 4 * 14 * 3
    assert training_flops(model, 10) == 10 * per_example


def test_planted_index_and_synthetic_cache(tmp_path):
    index, splits = planted_index(2000, seed=0)
    assert len(index) == 2000 and index.labels.shape == (2000, len(LABELS))
    assert 500 <= len(np.unique(index.patients)) <= 600
    for split in ("train", "val", "test"):
        assert set(index.patients[splits.mask(split)]).isdisjoint(index.patients[~splits.mask(split)])
    assert 0.6 < splits.mask("train").mean() < 0.8
    (tmp_path / "resnet.h5").write_bytes(b"a real cache")
    write_bench_cache(tmp_path, index=index, dim=32, seed=0)
    assert (tmp_path / "resnet.h5").read_bytes() == b"a real cache"  # other caches are left alone
    stored = read_features(cache_path(tmp_path, BACKBONE))
    assert stored.features.shape == (2000, 32) and stored.features.dtype == np.float16
    np.testing.assert_array_equal(stored.names, index.names)


def test_conv_flops_by_hand():
    head = HeadConfig(kind="cnn", filters=(4, 8), units=(6,), dropout=0.0)
    model = build_head(kind="cnn", inputs={"px": (16, 16)}, n_labels=14, head=head, seed=0)
    convs = (
        2 * 16 * 16 * (3 * 3 * 1 * 4) * 2 + 2 * 8 * 8 * (3 * 3 * 4 * 8) * 3
    )  # the first: no input gradient
    dense = 2 * (4 * 4 * 8) * 6 * 3 + 2 * 6 * 14 * 3  # conv tower ends on a 4 x 4 grid of 8 channels
    assert training_flops(model, 1) == convs + dense


@pytest.mark.parametrize("conv", [True, False])
def test_floor_products_compute_the_forward_product(conv):
    # The weight gradient of a product does not depend on its weights; only the forward product does. A
    # floor step whose result ignored the forward product would let TensorFlow prune it from the timing.
    x = tf.random.normal((4, 8, 8, 3) if conv else (4, 3), seed=3)
    shape = (3, 3, 3, 5) if conv else (3, 5)
    results = []
    for seed in (1, 2):
        kernel = tf.Variable(tf.random.normal(shape, seed=seed))
        results.append(float(_product_step(conv=conv, kernel=kernel, input_grad=False)(x)))
    assert results[0] != results[1]


def test_bench_heads_reports_consistent_figures(tmp_path):
    result = bench_heads(rows=3000, dim=64, workdir=tmp_path, epochs=1, cnn_rows=300, cnn_size=32)
    for key in (
        "load_s",
        "epoch_s",
        "floor_s",
        "ratio",
        "cpu_ratio",
        "matmul_gflops",
        "matmul_floor_s",
        "matmul_ratio",
        "train_head_s",
        "peak_memory_mb",
    ):
        assert result[key] > 0, key
    # the figures are rounded to 3 decimals; allow for that in the quotient
    rounding = result["ratio"] * 0.0006 / result["floor_s"] + 0.01
    assert abs(result["ratio"] - result["epoch_s"] / result["floor_s"]) < rounding
    assert result["rows"] == 3000 and result["dim"] == 64
    assert 1900 < result["train_rows"] < 2300
    assert (tmp_path / "runs" / "bench-fc" / "metrics.json").is_file()
    for key in (
        "cnn_epoch_s",
        "cnn_step_s",
        "cnn_floor_s",
        "cnn_ratio",
        "cnn_cpu_ratio",
        "cnn_train_gflop_per_epoch",
    ):
        assert result[key] > 0, key
    assert result["cnn_steps_per_epoch"] == -(-result["cnn_train_rows"] // result["cnn_batch_size"])
    assert result["cnn_batch_size"] == 32  # the "auto" batch of ~210 training images
    text = format_bench_heads(result)
    assert "x the floor" in text and " ms a step" in text and " GFLOP/s" in text and "{" not in text


def test_quality_runs_can_be_narrowed_to_some_problems():
    local = only_problems(QUALITY_RUNS, ("local",))
    assert local and {r[0] for r in local} == {"local"}
    assert {r[1] for r in local} == {"linear", "fc", "attention", "attentive"}
    assert only_problems(QUALITY_RUNS, ()) == QUALITY_RUNS
    assert {r[0] for r in only_problems(QUALITY_RUNS, ("linear", "metadata"))} == {"linear", "metadata"}
    assert {r[0] for r in QUALITY_RUNS} == set(PROBLEMS)
    with pytest.raises(InputError, match="unknown planted problem 'locals'.*valid: linear, nonlinear"):
        only_problems(QUALITY_RUNS, ("local", "locals"))


def test_bench_heads_problems_needs_quality(capsys):
    assert run.main(["bench", "heads", "--problems", "local"]) == 2
    assert "--problems needs --quality" in capsys.readouterr().err
