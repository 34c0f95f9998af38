"""heads.start: a head starts at the probe, and direction units join it only where validation says so."""

import numpy as np

from heads.data import load_head_data
from heads.directions import direction_units, logistic_with_offset, validated_directions
from heads.probe import platt_scaling
from heads.start import fit_start, probe_blocks
from results.metrics import mean_defined, roc_auc_per_label
from tests.fixtures import make_index, make_splits, signal_data, write_cache


def _val_auc(start_logits, units, weights, labels):
    return mean_defined(roc_auc_per_label(labels, start_logits + units @ weights))


def test_direction_units_that_only_fit_training_noise_are_left_out(tmp_path):
    data = signal_data(tmp_path, make_index(400), name="a", noise=2.0)
    rows = {split: data.rows(split) for split in ("train", "val")}
    arrays = list(probe_blocks(data).values())
    probe = fit_start(data, rows=rows, max_directions=0, seed=0).probe
    slope, intercept = platt_scaling(probe.scores(arrays, rows["train"]), data.labels[rows["train"]])
    offsets = {split: probe.scores(arrays, r) * slope + intercept for split, r in rows.items()}
    # Random directions: the signal is linear, so whatever their units add was fitted to noise.
    random = np.linalg.qr(np.random.default_rng(0).standard_normal((24, 8)))[0]
    units = {split: direction_units(arrays, r, probe=probe, directions=random) for split, r in rows.items()}
    val = data.labels[rows["val"]]
    probe_val = mean_defined(roc_auc_per_label(val, offsets["val"]))
    every = logistic_with_offset(units["train"], data.labels[rows["train"]], offsets["train"])
    assert _val_auc(offsets["val"], units["val"], every, val) < probe_val  # all eight units hurt

    kept, weights = validated_directions(
        arrays, data.labels, rows, probe=probe, directions=random, offsets=offsets
    )
    assert kept.shape == (24, 0) and weights.shape == (0, val.shape[1])  # none of 1, 2, 4, 8 helped


def test_cross_fitted_scores_come_from_probes_fitted_without_those_patients():
    from sklearn.model_selection import GroupKFold

    from heads.probe import cross_fitted_scores, normal_equations

    rng = np.random.default_rng(0)
    features = rng.normal(size=(600, 20)).astype(np.float32) * rng.uniform(0.5, 3, 20) + rng.normal(size=20)
    labels = (features[:, :3] + rng.normal(size=(600, 3)) > 0.5).astype(np.float32)
    patients = rng.integers(0, 150, 600)
    rows, penalty = np.arange(500), 0.05
    equations = normal_equations([features], labels, rows=rows)
    honest = cross_fitted_scores(
        [features], labels, rows=rows, groups=patients, equations=equations, penalty=penalty
    )
    standardized = (features - equations.mean) / equations.scale
    for _, held in GroupKFold(5).split(rows, groups=patients[rows]):
        assert not set(patients[held]) & set(patients[np.setdiff1d(rows, held)])  # whole patients held out
        left = standardized[np.setdiff1d(rows, held)]
        targets = labels[np.setdiff1d(rows, held)]
        centered = left - left.mean(axis=0)
        weights = np.linalg.solve(
            centered.T @ centered + penalty * len(left) * np.eye(20), centered.T @ (targets - targets.mean(0))
        )
        direct = (standardized[held] - left.mean(axis=0)) @ weights + targets.mean(axis=0)
        np.testing.assert_allclose(honest[held], direct, atol=1e-4)


def test_the_training_rows_correction_is_the_out_of_fold_minus_the_in_sample_logit(tmp_path):
    from heads.probe import cross_fitted_scores, normal_equations

    data = signal_data(tmp_path, make_index(300), name="a", noise=1.0)
    rows = {split: data.rows(split) for split in ("train", "val")}
    start = fit_start(data, rows=rows, max_directions=0, seed=0)
    arrays = list(probe_blocks(data).values())
    equations = normal_equations(arrays, data.labels, rows=rows["train"])
    honest = cross_fitted_scores(
        arrays,
        data.labels,
        rows=rows["train"],
        groups=data.patients,
        equations=equations,
        penalty=start.probe.penalty,
    )
    from heads.probe import order_keeping

    # Calibrated on the honest scores, every slope kept positive.
    slope, _ = order_keeping(*platt_scaling(honest, data.labels[rows["train"]]), scores=honest)
    in_sample = start.probe.scores(arrays, rows["train"])
    np.testing.assert_allclose(start.train_correction, slope * (honest - in_sample), atol=1e-4)
    # The probe fits its own rows better than rows it has not seen: the correction is not zero.
    assert np.abs(start.train_correction).mean() > 0.01


def test_a_label_the_probe_barely_ranks_keeps_the_probes_order():
    from heads.probe import order_keeping

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(500, 2))
    labels = np.stack([scores[:, 0] > 0.3, rng.random(500) < 0.1], axis=1).astype(float)
    labels[:, 1] = (scores[:, 1] < -1.2) | (labels[:, 1] > 0)  # anti-correlated: Platt's slope is negative
    slope, intercept = platt_scaling(scores, labels)
    assert slope[0] > 0 and slope[1] < 0
    kept, shifted = order_keeping(slope, intercept, scores=scores)
    assert kept[0] == slope[0] and shifted[0] == intercept[0]  # a well-ranked label is left as fitted
    assert kept[1] > 0  # the order of the probe's scores is kept, so is its AUC
    logits = scores * kept + shifted
    assert np.array_equal(np.argsort(logits[:, 1]), np.argsort(scores[:, 1]))
    assert np.isclose(logits[:, 1].mean(), (scores[:, 1] * slope[1] + intercept[1]).mean())


def test_platt_scaling_stays_finite_where_the_scores_separate_the_labels():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(143, 2)) * 0.01
    labels = np.stack([scores[:, 0] > 0.012, rng.random(143) < 0.08], axis=1).astype(float)  # separable
    slope, intercept = platt_scaling(scores, labels)
    spread = scores.std(axis=0)
    assert np.all(np.isfinite(slope)) and np.all(np.abs(slope * spread) < 100)  # logits stay in reach
    assert slope[0] > 0 and np.all(np.isfinite(intercept))
    p = 1 / (1 + np.exp(-(scores * slope + intercept)))
    assert abs(p[:, 1].mean() - labels[:, 1].mean()) < 0.02  # the prior is kept on a label it cannot rank


def test_a_shared_common_start_gives_each_seed_its_own_whole_fit(tmp_path):
    from heads.start import fit_common_start

    index = make_index(3000)
    features = np.random.default_rng(0).normal(size=(3000, 32)).astype(np.float32)
    features[:, 0] *= np.where(index.labels[:, 0] > 0, 3.0, 1.0)  # a spread signal: directions find it
    features[:, 1] += index.labels[:, 1]
    write_cache(tmp_path, "a", names=index.names, features=features)
    data = load_head_data(
        cache_dir=tmp_path, backbones=["a"], index=index, splits=make_splits(index), metadata=True
    )
    rows = {split: data.rows(split) for split in ("train", "val")}
    common = fit_common_start(data, rows=rows, directions=True)
    starts = {}
    for seed in (0, 1):
        whole = fit_start(data, rows=rows, max_directions=8, seed=seed)
        shared = fit_start(data, rows=rows, max_directions=8, seed=seed, common=common)
        assert whole.directions.shape[1] > 0  # the seed's own directions, validated beside the probe
        for name in ("kernel", "bias", "directions", "direction_weights", "train_correction"):
            assert np.array_equal(getattr(whole, name), getattr(shared, name)), name
        assert np.array_equal(whole.probe.weights, shared.probe.weights)
        assert whole.probe.penalty == shared.probe.penalty
        starts[seed] = shared
    assert not np.array_equal(starts[0].directions, starts[1].directions)  # each seed draws its own
    # A common start fitted without the directions' moments is refitted for a head that asks for them.
    linear = fit_common_start(data, rows=rows, directions=False)
    again = fit_start(data, rows=rows, max_directions=8, seed=0, common=linear)
    assert np.array_equal(again.directions, starts[0].directions)
