"""heads.start: a head starts at the probe, and direction units join it only where validation says so."""

import numpy as np

from heads.data import load_head_data
from heads.directions import logistic_with_offset
from heads.probe import platt_scaling
from heads.start import _units, _validated_directions, fit_start, probe_blocks
from results.metrics import mean_defined, roc_auc_per_label
from tests.fixtures import make_index, make_splits, signal_features, write_cache


def _val_auc(start_logits, units, weights, labels):
    return mean_defined(roc_auc_per_label(labels, start_logits + units @ weights))


def test_direction_units_that_only_fit_training_noise_are_left_out(tmp_path):
    index = make_index(400)
    write_cache(tmp_path, "a", names=index.names, features=signal_features(index, dim=24, noise=2.0))
    data = load_head_data(
        cache_dir=tmp_path, backbones=["a"], index=index, splits=make_splits(index), metadata=False
    )
    rows = {split: data.rows(split) for split in ("train", "val")}
    arrays = list(probe_blocks(data).values())
    probe = fit_start(data, rows=rows, max_directions=0, seed=0).probe
    slope, intercept = platt_scaling(probe.scores(arrays, rows["train"]), data.labels[rows["train"]])
    offsets = {split: probe.scores(arrays, r) * slope + intercept for split, r in rows.items()}
    # Random directions: the signal is linear, so whatever their units add was fitted to noise.
    random = np.linalg.qr(np.random.default_rng(0).standard_normal((24, 8)))[0]
    units = {split: _units(arrays, r, probe=probe, directions=random) for split, r in rows.items()}
    val = data.labels[rows["val"]]
    probe_val = mean_defined(roc_auc_per_label(val, offsets["val"]))
    every = logistic_with_offset(units["train"], data.labels[rows["train"]], offsets["train"])
    assert _val_auc(offsets["val"], units["val"], every, val) < probe_val  # all eight units hurt

    kept, weights = _validated_directions(
        arrays, data.labels, rows, probe=probe, directions=random, offsets=offsets
    )
    assert kept.shape == (24, 0) and weights.shape == (0, val.shape[1])  # none of 1, 2, 4, 8 helped
