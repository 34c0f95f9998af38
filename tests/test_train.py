"""heads.train and heads.scoring: a run folder with every output, repeatable, independent of cache row order."""

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cxr14.errors import InputError
from dataset.settings import LABELS
from heads.data import load_head_data
from heads.run_folder import MARKER, OUTPUTS
from heads.scoring import score_run
from heads.settings import HeadConfig
from tests.fixtures import FAST, FC, make_index, make_splits, signal_features, train_quickly, write_cache


@pytest.fixture(scope="module")
def index():
    return make_index(360)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, index):
    """One cache in index order, one with its rows shuffled, one with views, one of pixels."""
    root = tmp_path_factory.mktemp("cache")
    features = signal_features(index, dim=24, noise=0.5)
    order = np.random.default_rng(7).permutation(len(index))
    write_cache(root, "plain", names=index.names, features=features)
    write_cache(root, "shuffled", names=index.names[order], features=features[order])
    write_cache(root, "other", names=index.names, features=signal_features(index, dim=8, seed=3, noise=0.5))
    noise = np.random.default_rng(9).standard_normal((len(index), 8)).astype(np.float16)
    write_cache(root, "noise", names=index.names, features=noise)
    write_cache(root, "weak", names=index.names, features=signal_features(index, dim=24, noise=3.0))
    views = np.stack([features, features + np.float16(0.1), features - np.float16(0.1)], axis=1)
    write_cache(root, "views", names=index.names, features=views, views=3)
    # A local finding, as on a film: Atelectasis positives get a bright patch in the lower left corner.
    pixels = np.random.default_rng(0).integers(0, 60, (len(index), 12, 12))
    pixels[:, 7:11, 1:5] += index.labels[:, :1, None] * 120
    write_cache(root, "pixels", names=index.names, features=pixels.astype(np.uint8), kind="pixels")
    return root


def _data(cache_dir, index, backbones, *, metadata=False):
    return load_head_data(
        cache_dir=cache_dir, backbones=backbones, index=index, splits=make_splits(index), metadata=metadata
    )


def test_fc_run_writes_every_output_and_learns(tmp_path, cache_dir, index):
    data = _data(cache_dir, index, ["plain"], metadata=True)
    metrics = train_quickly(tmp_path / "run", data)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted([*OUTPUTS, MARKER])
    assert metrics["mean_auc"] > 0.75, metrics["mean_auc"]  # labels are linear in the features
    lo, hi = metrics["mean_ci"]
    assert lo <= metrics["mean_auc"] <= hi
    assert metrics["split"] == "test" and metrics["split_source"] == "patient-random"
    assert metrics["rows"] == {s: int((data.split == s).sum()) for s in ("train", "val", "test")}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["mean_auc"] == metrics["mean_auc"] and saved["excluded"] == data.excluded
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(history["epoch"]) == list(range(len(history)))  # epoch 0: the untrained head (the probe)
    assert history["chosen"].sum() == 1
    assert metrics["val_mean_auc"] == pytest.approx(history.loc[history["chosen"], "val_mean_auc"].item())
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert list(predictions.columns) == ["name", "split", *LABELS]
    assert list(predictions["name"]) == list(data.names)
    assert "Atelectasis" in (tmp_path / "run" / "auc.md").read_text()
    _check_baselines_and_decisions(tmp_path / "run", metrics, data)


def test_a_later_epoch_replaces_the_probe_only_beyond_validation_noise(tmp_path, cache_dir, index):
    # A weak linear signal: the probe is all there is to learn, and a later epoch scores a hair higher on
    # validation by chance (epoch 2 here, +0.0005 with an interval across zero).
    # No second-order units: the start is the probe alone.
    weak = train_quickly(tmp_path / "weak", _data(cache_dir, index, ["weak"]), head=PROBE_ONLY_FC)
    selection = weak.get("selection")
    if selection:  # a later epoch scored higher by chance, and was refused as within the noise
        assert selection["best_val_epoch"] > 0 and selection["gain_over_start"] > 0
        assert selection["kept_start"] is True and selection["gain_ci"][0] <= 0
        assert selection["gain_ci_level"] == pytest.approx(1 - 0.1 / weak["epochs"])
    assert weak["best_epoch"] == 0 and weak["kept_probe"] is True and weak["start"] == "probe"
    assert weak["reference"]["difference"] == pytest.approx(0.0, abs=1e-6)  # the probe itself
    history = pd.read_csv(tmp_path / "weak" / "history.csv")
    assert history["chosen"].tolist() == [True] + [False] * (len(history) - 1)
    assert weak["val_mean_auc"] == pytest.approx(history["val_mean_auc"].iloc[0])


PROBE_ONLY_FC = dataclasses.replace(FC, directions=0)


def test_the_start_is_replaced_only_beyond_a_bound_shared_by_the_epochs():
    from heads.train import selection_level

    assert selection_level(epochs=1) == pytest.approx(0.90)  # one epoch: a one-sided 95 % bound
    assert selection_level(epochs=10) == pytest.approx(0.99)  # the best of ten: 0.5 % each


def _check_baselines_and_decisions(run, metrics: dict, data) -> None:
    """The metadata baseline, chance, and the calibration and operating points fitted on validation."""
    baselines = metrics["baselines"]
    assert baselines["chance_auc"] == 0.5 and baselines["beats_metadata"] is True
    assert set(baselines["metadata"]["labels"]) == set(LABELS)
    assert metrics["synthetic"] is False and "notice" not in metrics
    thresholds = json.loads((run / "thresholds.json").read_text())
    calibration = json.loads((run / "calibration.json").read_text())
    assert thresholds["fitted_on"] == "val" and thresholds["method"] == "youden"
    assert calibration["fitted_on"] == "val" and calibration["method"] == "platt"
    assert thresholds["images"] == calibration["images"] == int((data.split == "val").sum())
    point = metrics["operating_points"]["labels"]["Atelectasis"]
    assert point["threshold"] == thresholds["labels"]["Atelectasis"]["threshold"]
    assert point["tp"] + point["fn"] == metrics["labels"]["Atelectasis"]["positives"]
    low, high = point["sensitivity"]["ci"]
    assert low <= point["sensitivity"]["value"] <= high
    assert metrics["calibration"]["ece_before"] >= 0 and metrics["calibration"]["ece_after"] >= 0
    assert metrics["operating_points"]["in_sample"] is False
    text = (run / "auc.md").read_text()
    assert text.startswith("# ROC AUC per disease: run\n")  # the run's name, not its temporary folder's
    assert "Metadata baseline" in text and "Wang et al. 2017" in text
    assert (
        "| Disease | Threshold | Sensitivity [95% CI] | Specificity [95% CI] | PPV [95% CI] | NPV [95% CI]"
        in text
    )
    assert "does not beat" not in text
    assert (run / "calibration.png").read_bytes().startswith(b"\x89PNG")


def test_a_synthetic_run_on_noise_is_flagged_and_says_so_in_every_output(tmp_path, cache_dir, index):
    from PIL import Image

    from cxr14.caveats import SYNTHETIC_NOTICE

    data = dataclasses.replace(
        _data(cache_dir, index, ["noise"]),
        synthetic=True,
        split_source="synthetic sample (official-format lists)",
    )
    metrics = train_quickly(tmp_path / "run", data, train=dataclasses.replace(FAST, epochs=2))
    run = tmp_path / "run"
    assert metrics["baselines"]["beats_metadata"] is False
    text = (run / "auc.md").read_text()
    assert "does not beat the metadata-only baseline" in text
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["synthetic"] is True and saved["notice"] == SYNTHETIC_NOTICE == metrics["notice"]
    assert "official" not in saved["split_source"].replace("official-format", "")
    assert SYNTHETIC_NOTICE in text.splitlines()[0]
    # No published column is set beside a synthetic run.
    assert all(title not in text for title in ("Wang et al. 2017", "CheXNet", "Blog"))
    for plot in ("roc.png", "auc.png", "calibration.png"):
        assert SYNTHETIC_NOTICE in Image.open(run / plot).text["Title"], plot
    assert "beside published" not in Image.open(run / "auc.png").text["Title"]


def test_evaluate_run_recomputes_the_test_metrics(tmp_path, cache_dir, index):
    data = _data(cache_dir, index, ["plain"])
    metrics = train_quickly(tmp_path / "run", data)
    again = score_run(
        run_dir=tmp_path / "run", data=data, split="test", n_boot=FAST.bootstrap, seed=FAST.seed
    )
    assert again["mean_auc"] == pytest.approx(metrics["mean_auc"], abs=1e-6)
    assert again["mean_ci"] == pytest.approx(metrics["mean_ci"], abs=1e-6)
    val = score_run(run_dir=tmp_path / "run", data=data, split="val", n_boot=0, seed=0)
    assert val["mean_auc"] == pytest.approx(metrics["val_mean_auc"], abs=1e-6)  # best weights were kept
    assert (tmp_path / "run" / "evaluate-val.json").is_file()


def test_label_with_one_class_in_test_is_undefined_not_a_crash(tmp_path, cache_dir, index):
    data = _data(cache_dir, index, ["plain"])
    labels = data.labels.copy()
    labels[data.split == "test", LABELS.index("Hernia")] = 0
    data = dataclasses.replace(data, labels=labels)
    metrics = train_quickly(
        tmp_path / "run", data, train=dataclasses.replace(FAST, epochs=1, loss="weighted")
    )
    assert metrics["undefined"] == ["Hernia"] and metrics["labels"]["Hernia"]["auc"] is None
    assert (
        metrics["mean_auc"] is not None
        and "| Hernia | 0 | undefined |" in (tmp_path / "run" / "auc.md").read_text()
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted([*OUTPUTS, MARKER])


def test_evaluating_under_other_labels_is_refused(tmp_path, cache_dir, index):
    data = _data(cache_dir, index, ["plain"])
    train_quickly(tmp_path / "run", data, train=dataclasses.replace(FAST, epochs=1))
    # The config's labels reordered after training: every AUC would go to the wrong disease.
    reordered = dataclasses.replace(data, label_names=tuple(reversed(data.label_names)))
    with pytest.raises(InputError, match="not the index's label columns"):
        score_run(run_dir=tmp_path / "run", data=reordered, split="test", n_boot=0, seed=0)
    with pytest.raises(InputError, match="not the index's label columns"):
        train_quickly(tmp_path / "other", reordered)


def test_cache_row_order_does_not_change_the_result(tmp_path, cache_dir, index):
    in_order = train_quickly(tmp_path / "a", _data(cache_dir, index, ["plain"]))
    shuffled_data = _data(cache_dir, index, ["shuffled"])
    shuffled = train_quickly(tmp_path / "b", shuffled_data)
    assert shuffled["mean_auc"] == pytest.approx(in_order["mean_auc"], abs=1e-6)
    a = pd.read_csv(tmp_path / "a" / "predictions.csv")
    b = pd.read_csv(tmp_path / "b" / "predictions.csv")
    np.testing.assert_allclose(a[list(LABELS)], b[list(LABELS)], atol=1e-5)


def test_existing_run_is_not_overwritten_without_force(tmp_path, cache_dir, index):
    data = _data(cache_dir, index, ["plain"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="run exists; pick another run name"):
        train_quickly(tmp_path / "run", data)
    with pytest.raises(InputError, match="not a run folder this project made"):
        train_quickly(tmp_path / "run", data, force=True)  # the user's own folder: --force does not touch it
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]
    one_epoch = dataclasses.replace(FAST, epochs=1)
    train_quickly(tmp_path / "made", data, train=one_epoch)
    (tmp_path / "made" / "notes.txt").write_text("mine")
    train_quickly(tmp_path / "made", data, train=one_epoch, force=True)  # a run folder: replaced, notes kept
    assert (tmp_path / "made" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "made" / "metrics.json").is_file()


def test_a_run_that_fails_leaves_no_folder_behind(tmp_path, cache_dir, index, monkeypatch):
    import heads.outputs

    def fail(*args, **kwargs):
        raise InputError("disk full")

    monkeypatch.setattr(heads.outputs, "_write_outputs", fail)
    with pytest.raises(InputError, match="disk full"):
        train_quickly(
            tmp_path / "run", _data(cache_dir, index, ["plain"]), train=dataclasses.replace(FAST, epochs=1)
        )
    assert list(tmp_path.iterdir()) == []  # neither the run nor its temporary folder


@pytest.mark.parametrize("loss", ["weighted", "focal"])
def test_linear_head_with_each_loss(tmp_path, cache_dir, index, loss):
    train = dataclasses.replace(FAST, loss=loss, epochs=3)
    metrics = train_quickly(
        tmp_path / "run", _data(cache_dir, index, ["plain"]), head=HeadConfig(kind="linear"), train=train
    )
    assert metrics["mean_auc"] > 0.7


def test_ensemble_run(tmp_path, cache_dir, index):
    head = HeadConfig(kind="ensemble", units=(16,), transition=8, dropout=0.1)
    metrics = train_quickly(tmp_path / "run", _data(cache_dir, index, ["plain", "other"]), head=head)
    assert metrics["backbones"] == ["plain", "other"]
    assert metrics["mean_auc"] > 0.75


def test_cnn_run_on_cached_pixels(tmp_path, cache_dir, index):
    head = HeadConfig(kind="cnn", units=(8,), filters=(8,), dropout=0.0)
    train = dataclasses.replace(FAST, epochs=12, lr=1e-2, patience=12)
    metrics = train_quickly(tmp_path / "run", _data(cache_dir, index, ["pixels"]), head=head, train=train)
    # Only Atelectasis is drawn into the pixels.
    assert metrics["labels"]["Atelectasis"]["auc"] > 0.8


def test_augment_trains_on_cached_views(tmp_path, cache_dir, index):
    data = _data(cache_dir, index, ["views"], metadata=True)
    metrics = train_quickly(tmp_path / "run", data, train=dataclasses.replace(FAST, augment=True))
    assert metrics["mean_auc"] > 0.75
    again = score_run(run_dir=tmp_path / "run", data=data, split="test", n_boot=0, seed=0)
    assert again["mean_auc"] == pytest.approx(metrics["mean_auc"], abs=1e-6)


def test_augment_without_views_is_refused(tmp_path, cache_dir, index):
    with pytest.raises(InputError, match="views > 1"):
        train_quickly(
            tmp_path / "run",
            _data(cache_dir, index, ["plain"]),
            train=dataclasses.replace(FAST, augment=True),
        )


def test_empty_val_split_is_refused(tmp_path, cache_dir, index):
    data = _data(cache_dir, index, ["plain"])
    no_val = dataclasses.replace(
        data, split=np.where(data.split == "val", "train", data.split).astype(object)
    )
    with pytest.raises(InputError, match="val split has no images"):
        train_quickly(tmp_path / "run", no_val)


def test_a_run_whose_best_epoch_is_the_last_allowed_says_it_did_not_converge(tmp_path, cache_dir, index):
    from heads.scoring import MONITOR, run_facts

    data = _data(cache_dir, index, ["plain"])
    rows = {s: data.rows(s) for s in ("train", "val", "test")}

    def facts(scores, epochs):
        best = int(np.argmax(scores))
        history = pd.DataFrame(
            {
                "epoch": range(len(scores)),
                "loss": 0.1,
                MONITOR: scores,
                "chosen": np.arange(len(scores)) == best,
            }
        )
        return run_facts(
            tmp_path / "r",
            data=data,
            head=FC,
            rows=rows,
            history=history,
            train=dataclasses.replace(FAST, epochs=epochs),
        )

    kept = facts([0.64, 0.62, 0.61], epochs=2)
    assert kept["best_epoch"] == 0 and kept["kept_probe"] is True
    with_units = SimpleNamespace(directions=np.zeros((24, 2)))  # a start of the probe and two units
    history = pd.DataFrame({"epoch": [0, 1], "loss": 0.1, MONITOR: [0.64, 0.6], "chosen": [True, False]})
    facts_with_units = run_facts(
        tmp_path / "r", data=data, head=FC, rows=rows, history=history, train=FAST, begin=with_units
    )
    assert facts_with_units["kept_probe"] is False  # epoch 0 is the probe and its units, not the probe
    assert facts_with_units["kept_start"] is True
    from results.format import KEPT_START, probe_note

    assert probe_note(facts_with_units | {"head": "fc"}) == KEPT_START

    still_rising = facts([0.6, 0.62, 0.64], epochs=2)
    assert still_rising["converged"] is False and still_rising["best_epoch"] == 2
    assert facts([0.6, 0.62, 0.61], epochs=2)["converged"] is True
    assert facts([0.6, 0.62, 0.64], epochs=10)["converged"] is True  # stopped early: not at the cap


def test_fused_adamw_takes_keras_adamw_steps():
    import keras
    import tensorflow as tf

    from heads.train import FusedAdamW

    def trained(optimizer):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((16,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
        )
        model.compile(optimizer, keras.losses.BinaryCrossentropy(from_logits=True))
        x = tf.random.stateless_normal((128, 16), seed=(1, 2))
        y = tf.cast(tf.random.stateless_uniform((128, 3), seed=(3, 4)) < 0.3, tf.float32)
        start = [w.copy() for w in model.get_weights()]
        model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
        return start, model.get_weights()

    schedule = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=24)
    start, reference = trained(keras.optimizers.AdamW(schedule, weight_decay=0.05))
    _, fused = trained(FusedAdamW(schedule, weight_decay=0.05))
    for before, want, got in zip(start, reference, fused, strict=True):
        assert np.abs(want - before).max() > 1e-3  # the weights moved
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_history_has_validation_loss_and_learning_rate_and_tensorboard_gets_them(tmp_path, cache_dir, index):
    data = _data(cache_dir, index, ["plain"])
    board = tmp_path / "board"
    train = dataclasses.replace(FAST, epochs=3, patience=3, tensorboard=str(board))
    train_quickly(tmp_path / "run", data, train=train)
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(history) >= 2
    # Epoch 0 is the untrained start: its validation loss is measured, no step has set a learning rate.
    assert np.isfinite(history["val_loss"]).all() and (history["val_loss"] > 0).all()
    assert np.isnan(history["learning_rate"].iloc[0])
    rates = history["learning_rate"].iloc[1:].to_numpy()
    # A cosine schedule from train.lr: below it after the first epoch, and falling.
    assert (rates < FAST.lr).all() and (np.diff(rates) < 0).all()
    # The validation loss is the run's loss on the validation rows: a worse head than the start has a
    # different one, so the column is not a copy of the training loss.
    assert not np.allclose(history["val_loss"].iloc[1:], history["loss"].iloc[1:])
    events = list(board.rglob("events.out.tfevents.*"))
    assert events, list(board.rglob("*"))


def test_a_trained_run_records_what_made_it(tmp_path):
    from cxr14.made_by import git_state, made_by

    made = made_by(source_dir=Path(__file__).resolve().parents[1])
    assert set(made["versions"]) == {
        "python",
        "tensorflow",
        "keras",
        "numpy",
        "h5py",
        "scikit-learn",
        "pandas",
    }
    assert made["versions"]["numpy"] == np.__version__
    assert made["command"] == sys.argv
    assert len(made["git"]["commit"]) == 40 and isinstance(made["git"]["dirty"], bool)
    # Outside a repository (or without git), both are "unknown", never an error.
    assert git_state(tmp_path) == {"commit": "unknown", "dirty": "unknown"}


def test_training_rows_see_the_probe_as_on_images_it_has_not_seen(tmp_path, index, monkeypatch):
    # 8 signal columns and 120 of noise for ~250 training rows: a probe fits its own rows far better than
    # new ones. Out-of-fold logits leave the head a first-epoch loss like validation's; in-sample ones
    # (every row one "patient", so nothing is held out) leave it a fraction of it: nothing to learn.
    noise = np.random.default_rng(1).standard_normal((len(index), 120)).astype(np.float16)
    wide = np.concatenate([signal_features(index, dim=8, noise=1.0), noise], axis=1)
    write_cache(tmp_path / "cache", "wide", names=index.names, features=wide)
    data = _data(tmp_path / "cache", index, ["wide"])
    honest = pd.read_csv(_trained(tmp_path / "honest", data) / "history.csv")
    assert honest["loss"].iloc[1] > 0.8 * honest["val_loss"].iloc[0]

    import heads.start

    cross_fitted = heads.start.cross_fitted_scores
    monkeypatch.setattr(
        heads.start,
        "cross_fitted_scores",
        lambda *a, groups, **kw: cross_fitted(*a, groups=np.zeros_like(groups), **kw),
    )
    in_sample = pd.read_csv(_trained(tmp_path / "in_sample", data) / "history.csv")
    assert in_sample["loss"].iloc[1] < 0.5 * in_sample["val_loss"].iloc[0]


def _trained(run_dir, data, **options):
    train_quickly(run_dir, data, **options)
    return run_dir


def test_start_none_trains_the_head_alone_and_seeds_differ(tmp_path, cache_dir, index):
    data = _data(cache_dir, index, ["plain"])
    runs = {
        seed: train_quickly(
            tmp_path / f"s{seed}", data, train=dataclasses.replace(FAST, start="none", seed=seed)
        )
        for seed in (0, 1)
    }
    first, second = (pd.read_csv(tmp_path / f"s{seed}" / "predictions.csv") for seed in (0, 1))
    assert not np.allclose(first[list(LABELS)].to_numpy(), second[list(LABELS)].to_numpy(), atol=1e-4)
    for metrics in runs.values():
        assert metrics["start"] == "none" and metrics["kept_probe"] is False
        assert abs(metrics["reference"]["difference"]) > 1e-4  # not the probe, which is still the reference
        assert metrics["reference"]["name"] == "ridge probe"
    history = pd.read_csv(tmp_path / "s0" / "history.csv")
    assert history["val_mean_auc"].iloc[0] < history["val_mean_auc"].max()  # a random start, then learning


def test_linear_from_none_is_trained_not_closed_form(tmp_path, cache_dir, index):
    data = _data(cache_dir, index, ["plain"])
    linear = HeadConfig(kind="linear")
    metrics = train_quickly(
        tmp_path / "lin", data, head=linear, train=dataclasses.replace(FAST, start="none")
    )
    assert metrics["epochs"] > 0 and metrics["kept_probe"] is False
    probe = train_quickly(tmp_path / "probe", data, head=linear)
    assert probe["epochs"] == 0 and probe["kept_probe"] is True


def test_a_head_that_kept_the_probe_says_so_everywhere(tmp_path, cache_dir, index):
    from experiments.leaderboard import leaderboard
    from results.format import KEPT_PROBE
    from results.summary import summarize_metrics

    metrics = train_quickly(tmp_path / "weak", _data(cache_dir, index, ["weak"]), head=PROBE_ONLY_FC)
    assert metrics["kept_probe"] is True
    saved = json.loads((tmp_path / "weak" / "metrics.json").read_text())
    assert saved["kept_probe"] is True
    assert KEPT_PROBE in (tmp_path / "weak" / "auc.md").read_text()
    assert KEPT_PROBE in summarize_metrics(metrics, run_dir=tmp_path / "weak")
    assert "(kept the probe)" in leaderboard([tmp_path / "weak"])
    learned = train_quickly(
        tmp_path / "none", _data(cache_dir, index, ["plain"]), train=dataclasses.replace(FAST, start="none")
    )
    assert learned["kept_probe"] is False
    assert KEPT_PROBE not in (tmp_path / "none" / "auc.md").read_text()


def test_a_collapsed_first_epoch_loss_is_a_warning_naming_the_cause(tmp_path, cache_dir, index, monkeypatch):
    import heads.train

    monkeypatch.setattr(heads.train, "LOSS_FLOOR", 10.0)  # every loss is "collapsed"
    metrics = train_quickly(tmp_path / "run", _data(cache_dir, index, ["plain"]))
    (warning,) = metrics["warnings"]
    assert "after the first epoch" in warning and "nothing left" in warning
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["warnings"] == [warning]
    monkeypatch.setattr(heads.train, "LOSS_FLOOR", 1e-3)
    assert train_quickly(tmp_path / "ok", _data(cache_dir, index, ["plain"]))["warnings"] == []


def test_settings_show_only_what_the_head_kind_uses():
    from heads.settings import describe_settings

    train = dataclasses.asdict(FAST)
    linear = describe_settings({"kind": "linear"}, train)
    assert linear == ["start=probe"]  # closed form: no loss, lr, batch size or seed
    assert not any(part.startswith(("lr=", "batch_size=", "loss=")) for part in linear)
    fc = describe_settings(dataclasses.asdict(FC), train)
    assert {"start=probe", "loss=bce", "units=" + "-".join(map(str, FC.units))} <= set(fc)
    assert any(part.startswith("lr=") for part in fc)
    scratch = describe_settings({"kind": "linear"}, {**train, "start": "none"})
    assert "start=none" in scratch and any(part.startswith("lr=") for part in scratch)
    assert not any(part.startswith("start=") for part in describe_settings({"kind": "cnn"}, train))
