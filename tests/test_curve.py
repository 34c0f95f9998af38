"""experiments.curve and results.curve: nested patient-wise subsets, a curve that rises on planted signal,
the 100 % point equal to a plain train-head run, resume, a label without positives, the power law."""

import dataclasses
import json

import numpy as np
import pytest

import experiments.curve
import heads.start
import heads.train
from cxr14.errors import InputError
from experiments.curve import (
    CurveSize,
    SharedFit,
    curve_sizes,
    draw_curve,
    nested_subsets,
    plan_lines,
    point_data,
)
from heads.data import load_head_data
from heads.settings import TrainConfig
from results.curve import fit_power_law, plateau_images, power_law
from tests.fixtures import make_config, make_index, make_splits, signal_features, write_cache

REAL_TRAIN_HEAD = heads.train.train_head
REAL_TRAIN_POINT = experiments.curve.train_point
FRACTIONS = (0.05, 0.2, 1.0)


def test_subsets_are_nested_and_keep_patients_whole():
    patients = np.repeat(np.arange(200), np.random.default_rng(0).integers(1, 6, 200))
    sizes = curve_sizes(fractions=[0.3, 0.01, 0.1, 1])
    assert [s.fraction for s in sizes] == [0.01, 0.1, 0.3, 1.0]  # smallest first
    subsets = nested_subsets(patients, sizes=sizes, seed=3)
    for smaller, larger in zip(subsets, subsets[1:], strict=False):
        assert set(smaller) < set(larger)
    for size, rows in zip(sizes, subsets, strict=True):
        inside = np.zeros(len(patients), bool)
        inside[rows] = True
        for patient in np.unique(patients):  # every patient's images all in, or all out
            assert inside[patients == patient].all() or not inside[patients == patient].any()
        assert len(rows) >= size.target(len(patients))
        # the shortest prefix: without its last patient it would fall short
        assert len(rows) - 5 < size.target(len(patients)) or size.fraction == 1.0
    assert len(subsets[-1]) == len(patients)
    other = nested_subsets(patients, sizes=sizes, seed=4)
    assert not np.array_equal(other[1], subsets[1])  # a seed draws its own order


def test_image_counts_and_bad_sizes():
    patients = np.arange(30) // 3
    (rows,) = nested_subsets(patients, sizes=curve_sizes(images=[7]), seed=0)
    assert len(rows) == 9  # three whole patients
    with pytest.raises(InputError, match="more than the training split's 30"):
        nested_subsets(patients, sizes=curve_sizes(images=[31]), seed=0)
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        curve_sizes(fractions=[0.5, 1.5])
    with pytest.raises(InputError, match="not both"):
        curve_sizes(fractions=[0.5], images=[10])


def test_power_law_recovers_its_parameters_and_the_plateau():
    n = np.array([50, 200, 1000, 5000, 20000, 80000])
    fit = fit_power_law(n, power_law(n, 0.82, 1.5, 0.45))
    assert fit["a"] == pytest.approx(0.82, abs=1e-3) and fit["c"] == pytest.approx(0.45, abs=1e-2)
    # 95 % of the way from chance to the plateau: a - b n^-c = 0.5 + 0.95 (a - 0.5)
    assert power_law(fit["plateau_images"], fit["a"], fit["b"], fit["c"]) == pytest.approx(
        0.5 + 0.95 * (fit["a"] - 0.5), abs=1e-6
    )
    assert fit["extrapolated"] == (fit["plateau_images"] > n.max())
    assert plateau_images(a=0.8, b=1.5, c=0.5, largest=100)["extrapolated"] is True
    assert "at or below chance" in plateau_images(a=0.5, b=1.0, c=0.5, largest=100)["plateau_note"]
    assert "3 or more sizes" in fit_power_law([10, 100], [0.6, 0.7])["error"]


def _planted(tmp_path, *, n=1500, rare=False):
    """A config, the loaded data and the index: 1,500 images with a linear label signal."""
    index = make_index(n, seed=0)
    splits = make_splits(index)
    if rare:  # label 0: positive for one training patient only (and some val and test patients)
        train_patients = np.unique(index.patients[splits.assignment == "train"])
        keep = np.isin(index.patients, train_patients[:1]) | (splits.assignment != "train")
        index.labels[:, 0] = np.where(keep, index.labels[:, 0], 0)
    config = make_config(tmp_path)
    config = dataclasses.replace(config, train=TrainConfig(bootstrap=100, epochs=2))
    write_cache(config.cache_dir, "a", names=index.names, features=signal_features(index, noise=3.0))
    data = load_head_data(
        cache_dir=config.cache_dir, backbones=["a"], index=index, splits=splits, metadata=True
    )
    return config, data


def _draw(config, data, *, heads=("linear",), fractions=FRACTIONS, seeds=2, name="c"):
    plans = plan_lines(config, heads=heads, backbone_sets=["a"], changes={})
    return draw_curve(
        config, data=data, plans=plans, sizes=curve_sizes(fractions=fractions), seeds=seeds, name=name
    )


def _point_name(data, kwargs) -> str:
    """The folder name of the point train_point is called for (its size read from its training rows)."""
    train_rows = kwargs["rows"]["train"]
    full = len(train_rows) == data.rows("train").size
    return f"frac{1 if full else 0.2}-seed{kwargs['plan'].train.seed}"


def _counting(monkeypatch, data):
    calls = []

    def wrapper(narrowed, **kwargs):
        calls.append(_point_name(data, kwargs))
        return REAL_TRAIN_POINT(narrowed, **kwargs)

    monkeypatch.setattr(experiments.curve, "train_point", wrapper)
    return calls


def test_curve_rises_narrows_and_ends_at_a_plain_run(tmp_path):
    config, data = _planted(tmp_path)
    curve = _draw(config, data)
    rows = sorted(curve["summary"], key=lambda r: r["images"])
    aucs = [r["test_mean_auc"] for r in rows]
    widths = [r["test_mean_ci"][1] - r["test_mean_ci"][0] for r in rows]
    assert aucs[0] < aucs[1] < aucs[2]
    assert widths[2] < widths[0]
    assert rows[-1]["images"] == data.rows("train").size and rows[0]["patients"] < rows[1]["patients"]
    # The full-training-split point is a plain train-head run on the same cache and seed (loaded as
    # train-head loads it: without the metadata columns, which the linear head does not take).
    # Every seed's: the seeds after the first reuse the first's closed-form fit (SharedFit).
    for seed in (config.train.seed, config.train.seed + 1):
        train = dataclasses.replace(config.train, seed=seed).sized_for(data.rows("train").size)
        plain = REAL_TRAIN_HEAD(
            run_dir=tmp_path / f"plain{seed}",
            data=dataclasses.replace(data, metadata=None),
            head=config.head("linear"),
            train=train,
            label_names=config.labels,
            config_snapshot={},
            progress=False,
        )
        full = next(p for p in curve["points"] if p["size"] == "100%" and p["seed"] == seed)
        assert full["test_mean_auc"] == plain["mean_auc"] and full["test_mean_ci"] == plain["mean_ci"]
        assert full["val_mean_auc"] == plain["val_mean_auc"]
    folder = config.runs_dir / "c"
    assert {"curve.md", "curve.json", "curve.png"} <= {p.name for p in folder.iterdir()}
    written = json.loads((folder / "curve.json").read_text())
    assert len(written["points"]) == 6 and "linear-a" in written["fits"]
    assert written["metadata_baseline"]["mean_auc"] is not None
    assert "linear-a" in (folder / "curve.md").read_text()


def test_curve_resumes_and_retrains_only_what_changed(tmp_path, monkeypatch):
    config, data = _planted(tmp_path, n=600)
    first = _draw(config, data, fractions=(0.2, 1.0), seeds=1)
    calls = _counting(monkeypatch, data)
    again = _draw(config, data, fractions=(0.2, 1.0), seeds=2)
    assert calls == ["frac0.2-seed1", "frac1-seed1"]  # only the new seed's points
    assert again["points"][0] == first["points"][0]
    calls.clear()
    changed = dataclasses.replace(config, train=dataclasses.replace(config.train, bootstrap=50))
    _draw(changed, data, fractions=(0.2, 1.0), seeds=1)
    assert len(calls) == 2  # a setting changed: neither point is reused


def test_interrupted_point_is_trained_again(tmp_path, monkeypatch):
    config, data = _planted(tmp_path, n=600)

    def dies(narrowed, **kwargs):
        if _point_name(data, kwargs) == "frac1-seed0":
            raise KeyboardInterrupt
        return REAL_TRAIN_POINT(narrowed, **kwargs)

    monkeypatch.setattr(experiments.curve, "train_point", dies)
    with pytest.raises(KeyboardInterrupt):
        _draw(config, data, fractions=(0.2, 1.0), seeds=1)
    assert (config.runs_dir / "c" / "linear-a" / "frac0.2-seed0" / "point.json").is_file()
    calls = _counting(monkeypatch, data)
    _draw(config, data, fractions=(0.2, 1.0), seeds=1)
    assert calls == ["frac1-seed0"]


def test_label_without_positives_in_a_subset_is_reported(tmp_path):
    config, data = _planted(tmp_path, rare=True)
    curve = _draw(config, data, fractions=(0.05, 1.0), seeds=3)
    label = config.labels[0]
    train = data.rows("train")
    for point in curve["points"]:
        size = CurveSize(fraction=0.05 if point["size"] == "5%" else 1.0)
        (rows,) = nested_subsets(data.patients[train], sizes=[size], seed=point["seed"])
        positives = int(data.labels[train[rows], 0].sum())
        assert point["positives"][label] == positives
        assert (label in point["no_positives"]) == (positives == 0)
        assert point["test_mean_auc"] is not None  # trained and scored all the same
    small = next(r for r in curve["summary"] if r["size"] == "5%")
    expected = sum(label in p["no_positives"] for p in curve["points"] if p["size"] == "5%")
    assert expected > 0 and small["without_positives"][label] == expected


def test_point_data_narrows_without_copying(tmp_path):
    config, data = _planted(tmp_path, n=300)
    (plan,) = plan_lines(config, heads=["linear"], backbone_sets=["a"], changes={}).values()
    narrowed = point_data(data, plan=plan)
    assert narrowed.features["a"] is data.features["a"] and narrowed.labels is data.labels
    assert narrowed.metadata is None  # the linear head does not take the metadata columns


def test_only_a_seedless_fit_is_shared(tmp_path, monkeypatch):
    config, data = _planted(tmp_path, n=600)
    plans = plan_lines(config, heads=["linear", "fc"], backbone_sets=["a"], changes={})
    assert [SharedFit.seedless(p) for p in plans.values()] == [True, False]
    fits = []
    real_fit = heads.train.fit

    def counting_fit(*args, **kwargs):
        fits.append(kwargs["train"].seed)
        return real_fit(*args, **kwargs)

    commons = []
    real_common = heads.start.fit_common_start

    def counting_common(data, **kwargs):
        commons.append(kwargs["directions"])
        return real_common(data, **kwargs)

    monkeypatch.setattr(heads.train, "fit", counting_fit)
    monkeypatch.setattr(heads.start, "fit_common_start", counting_common)
    curve = _draw(config, data, heads=("linear", "fc"), fractions=(0.2, 1.0), seeds=2)
    # linear: 2 seeds at 20 %, one fit for both seeds at 100 %; fc: every point its own fit
    assert fits == [0, 1, 0] + [0, 1, 0, 1]
    # The seed-independent start: per seed at 20 %, once for both seeds at 100 % (fc: with the moments)
    assert commons == [False, False, False] + [True, True, True]
    full = [p for p in curve["points"] if p["size"] == "100%" and p["line"] == "linear-a"]
    assert full[0]["test_mean_auc"] == full[1]["test_mean_auc"]
    assert full[0]["test_mean_ci"] != full[1]["test_mean_ci"]  # each seed's own bootstrap draws


def test_fc_points_at_100_percent_share_their_start_and_equal_plain_runs(tmp_path):
    config, data = _planted(tmp_path, n=600)
    plans = plan_lines(config, heads=["fc"], backbone_sets=["a"], changes={})
    (plan,) = plans.values()
    curve = _draw(config, data, heads=("fc",), fractions=(1.0,), seeds=2)
    for seed in (config.train.seed, config.train.seed + 1):
        train = dataclasses.replace(plan.train, seed=seed).sized_for(data.rows("train").size)
        plain = REAL_TRAIN_HEAD(
            run_dir=tmp_path / f"plain{seed}",
            data=point_data(data, plan=plan),
            head=plan.head,
            train=train,
            label_names=config.labels,
            config_snapshot={},
            progress=False,
        )
        full = next(p for p in curve["points"] if p["seed"] == seed)
        assert full["test_mean_auc"] == plain["mean_auc"] and full["test_mean_ci"] == plain["mean_ci"]
        assert full["val_mean_auc"] == plain["val_mean_auc"]


def test_cli_curve_two_lines(tiny_project, tmp_path):
    import run

    args = ["--config", str(tiny_project.path), "--runs-dir", str(tmp_path / "runs")]
    args += ["--head", "linear", "--backbone", "offline_cnn", "--backbone", "offline_cnn_wide"]
    code = run.main(["curve", *args, "--fractions", "0.3,0.6,1", "--seeds", "1", "--name", "k"])
    assert code == 0
    curve = json.loads((tmp_path / "runs" / "k" / "curve.json").read_text())
    assert set(curve["fits"]) == {"linear-offline_cnn", "linear-offline_cnn_wide"}
    assert curve["notice"].startswith("synthetic sample")
    assert (tmp_path / "runs" / "k" / "curve.png").stat().st_size > 0
    bad = run.main(["curve", *args, "--fractions", "0,1"])
    assert bad == 2
