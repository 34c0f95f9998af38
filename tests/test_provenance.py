"""experiments/provenance.py: a head trains only on the configured backbone's features, the run records the
backbone as extracted, and features of one's own train without a [backbones] table."""

import collections
import dataclasses
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import run
from cache import store
from cache.checksums import checksums
from cache.store import cache_path, read_attrs
from cxr14.errors import Fix, InputError
from experiments.data import open_config_dataset
from experiments.experiment import plan_run, run_evaluate, run_train_head
from experiments.provenance import extracted_backbone
from experiments.sweep import run_sweep
from heads.run_folder import claim_run
from inference.export import export_run
from inference.predict import predict_images


def _with(config, tmp_path, *, copy=(), **backbone_changes):
    """The tiny project with its own cache folder (holding copies of `copy`) and runs folder, and
    offline_cnn's settings changed by `backbone_changes`."""
    cache_dir = tmp_path / "features"
    cache_dir.mkdir(exist_ok=True)
    for name in copy:
        shutil.copy(cache_path(config.cache_dir, name), cache_path(cache_dir, name))
    backbones = dict(config.backbones)
    backbones["offline_cnn"] = dataclasses.replace(backbones["offline_cnn"], **backbone_changes)
    return dataclasses.replace(config, cache_dir=cache_dir, runs_dir=tmp_path / "runs", backbones=backbones)


def _train(config, backbones="offline_cnn", *, name="r", kind="fc"):
    return run_train_head(config, kind=kind, backbones=backbones, name=name, force=False)


@pytest.fixture(scope="module")
def trained(tiny_project, tmp_path_factory):
    """One fc run on offline_cnn, trained from the tiny project's caches."""
    config = dataclasses.replace(tiny_project, runs_dir=tmp_path_factory.mktemp("runs"))
    _train(dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=2)))
    return config, config.runs_dir / "r"


def test_a_stale_cache_is_refused_naming_the_settings_that_differ(tiny_project, tmp_path):
    config = _with(tiny_project, tmp_path, copy=["offline_cnn"], seed=5, width=16)
    with pytest.raises(InputError) as err:
        _train(config)
    message = str(err.value)
    assert "was extracted with other [backbones.offline_cnn] settings" in message and "\n" not in message
    assert "seed 0 in the cache, 5 in the config; width 8 in the cache, 16 in the config" in message
    assert err.value.fix == Fix("extract", {"backbone": "offline_cnn", "force": True})
    assert not config.runs_dir.exists()  # refused before anything is written


def test_another_backbones_file_under_this_name_is_refused(tiny_project, tmp_path):
    config = _with(tiny_project, tmp_path)
    shutil.copy(
        cache_path(tiny_project.cache_dir, "offline_cnn_wide"), cache_path(config.cache_dir, "offline_cnn")
    )
    with pytest.raises(InputError, match="holds features of backbone 'offline_cnn_wide'.*not 'offline_cnn'"):
        _train(config)


def test_shifted_names_are_refused(tiny_project, tmp_path):
    config = _with(tiny_project, tmp_path, copy=["offline_cnn"])
    with h5py.File(cache_path(config.cache_dir, "offline_cnn"), "a") as f:
        names = f["names"].asstr()[()]
        f["names"][...] = np.roll(names, 1).astype(object)  # every feature row now has its neighbour's name
    with pytest.raises(InputError, match="its names do not match the checksums written with them"):
        _train(config)


def test_shifted_feature_rows_are_refused_in_one_line_naming_the_file(tiny_project, tmp_path):
    """Names untouched, every feature row moved down one: a head would train on its neighbour's image."""
    config = _with(tiny_project, tmp_path, copy=["offline_cnn"])
    path = cache_path(config.cache_dir, "offline_cnn")
    with h5py.File(path, "a") as f:
        f["features"][...] = np.roll(f["features"][()], 1, axis=0)
    with pytest.raises(InputError) as err:
        _train(config)
    message = str(err.value)
    assert message.startswith(f"{path}: its features do not match the checksums") and "\n" not in message
    assert err.value.fix == Fix("extract", {"backbone": "offline_cnn", "force": True})


def test_recipe_attributes_edited_to_match_the_config_are_refused(tiny_project, tmp_path):
    config = _with(tiny_project, tmp_path, copy=["offline_cnn"], seed=5)
    path = cache_path(config.cache_dir, "offline_cnn")
    settings = read_attrs(path)["backbone_config"]
    with h5py.File(path, "a") as f:
        f.attrs["backbone_config"] = json.dumps({**settings, "seed": 5}, sort_keys=True)
    with pytest.raises(InputError, match="no longer give its fingerprint"):
        _train(config)


def test_a_sweep_refuses_a_stale_cache_before_making_its_folder(tiny_project, tmp_path):
    config = _with(tiny_project, tmp_path, copy=["offline_cnn"], seed=5)
    grid = tmp_path / "grid.toml"
    grid.write_text('head = ["fc"]\nbackbone = ["offline_cnn"]\n', encoding="utf-8")
    with pytest.raises(InputError, match="seed 0 in the cache, 5 in the config"):
        run_sweep(config, grid_path=grid, name="s")
    assert not config.runs_dir.exists()


def test_train_head_reads_each_caches_attributes_once(tiny_project, tmp_path, monkeypatch):
    """The check against the config and the load share one read of a cache's attributes."""
    config = _with(tiny_project, tmp_path, copy=["offline_cnn", "offline_cnn_wide"])
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=1))
    reads = collections.Counter()
    get_attrs = store._get_attrs  # every read of a file's attributes goes through it

    def counted(path, f):
        reads[Path(path).name] += 1
        return get_attrs(path, f)

    monkeypatch.setattr(store, "_get_attrs", counted)
    plan = plan_run(config, kind="ensemble", backbones="offline_cnn,offline_cnn_wide")
    run_train_head(config, kind="ensemble", backbones=plan.backbones, name="r", force=False, plan=plan)
    assert reads == {"offline_cnn.h5": 1, "offline_cnn_wide.h5": 1}


def test_the_run_records_the_backbone_as_extracted(trained):
    config, run_dir = trained
    saved = json.loads((run_dir / "config.json").read_text())
    attrs = read_attrs(cache_path(config.cache_dir, "offline_cnn"))
    assert saved["backbones"]["offline_cnn"] == extracted_backbone(attrs)
    assert saved["backbones"]["offline_cnn"] == config.backbones["offline_cnn"].as_dict()
    assert "resolved" not in saved["backbones"]["offline_cnn"]
    assert saved["caches"]["offline_cnn"]["fingerprint"] == attrs["fingerprint"]
    assert saved["caches"]["offline_cnn"]["image_list_sha256"] == attrs["image_list_sha256"]


def test_evaluate_refuses_a_cache_changed_since_training(trained, tmp_path):
    config, run_dir = trained
    changed = dataclasses.replace(config, cache_dir=tmp_path)
    original = cache_path(config.cache_dir, "offline_cnn")
    shutil.copy(original, cache_path(tmp_path, "offline_cnn"))
    run_evaluate(changed, run_dir=run_dir, split="val")  # the same cache, copied: fine
    with h5py.File(cache_path(tmp_path, "offline_cnn"), "a") as f:
        f.attrs["fingerprint"] = "0" * 64  # as if re-extracted by another recipe
        del f.attrs["backbone_config"]  # (so the fingerprint is not recomputed from it)
    with pytest.raises(InputError, match="changed since .* was trained on it \\(fingerprint differ"):
        run_evaluate(changed, run_dir=run_dir, split="val")


def _own_features(config, name="my_model", *, dim=24):
    """A cache written with h5py alone, as cache/README.md shows: no backbone settings in it."""
    index = open_config_dataset(config).index
    rng = np.random.default_rng(0)
    features = (index.labels @ rng.normal(size=(index.labels.shape[1], dim))).astype(np.float16)
    path = cache_path(config.cache_dir, name)
    with h5py.File(path, "w") as f:
        f.create_dataset("names", data=index.names.astype(str).tolist(), dtype=h5py.string_dtype())
        f.create_dataset("features", data=features)
        f.create_dataset("status", data=np.zeros(len(index), np.int8))
        f.create_dataset("errors", data=[""] * len(index), dtype=h5py.string_dtype())
        f.attrs.update(schema_version=2, backbone=name, kind="features", dtype="float16", views=1)
        rows = dict(
            names=index.names, features=features, status=np.zeros(len(index)), errors=[""] * len(index)
        )
        f.attrs["checksums"] = json.dumps(checksums(**rows))
        f.attrs["fingerprint"] = f"{name}-2024-05"
    return path


def test_features_of_your_own_train_without_a_backbones_table(tiny_project, tmp_path, capsys):
    config = _with(tiny_project, tmp_path)
    _own_features(config)
    assert "my_model" not in config.backbones
    common = [
        "--config",
        str(config.path),
        "--cache-dir",
        str(config.cache_dir),
        "--runs-dir",
        str(config.runs_dir),
    ]
    assert run.main(["train-head", *common, "--head", "fc", "--backbone", "my_model", "--epochs", "2"]) == 0
    saved = json.loads((config.runs_dir / "fc-my_model" / "config.json").read_text())
    assert saved["backbones"] == {"my_model": None}  # nothing invented: no image pipeline is known
    assert saved["feature_dtypes"] == {"my_model": "float16"}
    capsys.readouterr()
    image = next((config.data_dir / "images").glob("*.png"))
    assert run.main(["predict", "--run", str(config.runs_dir / "fc-my_model"), str(image)]) == 2
    error = capsys.readouterr().err.strip()
    assert "features of your own for backbone 'my_model'" in error and "\n" not in error
    with pytest.raises(InputError, match="no image pipeline to run"):
        export_run(run_dir=config.runs_dir / "fc-my_model", out_dir=tmp_path / "exported")
    with pytest.raises(InputError, match="no image pipeline to run"):
        predict_images(run_dir=config.runs_dir / "fc-my_model", inputs=[image], extract=config.extract)


def test_a_table_for_features_of_your_own_is_refused(tiny_project, tmp_path):
    config = _with(tiny_project, tmp_path)
    _own_features(config, name="offline_cnn")
    with pytest.raises(InputError, match="records no backbone settings.*remove that table"):
        _train(config)


def test_a_name_with_neither_table_nor_cache_says_both(tiny_project, tmp_path):
    config = _with(tiny_project, tmp_path)
    with pytest.raises(InputError, match="no \\[backbones.nope\\] table .* and there is no feature file"):
        _train(config, backbones="nope")


def test_a_failed_run_leaves_no_folder_and_killed_runs_leave_no_temporary_folder(tiny_project, tmp_path):
    from cxr14.temps import temp_path

    config = _with(tiny_project, tmp_path, copy=["offline_cnn"])
    config.runs_dir.mkdir()
    # A run killed earlier: its writer's pid is above any the kernel hands out.
    killed = config.runs_dir / temp_path(config.runs_dir / "r").name.replace(
        f".{os.getpid()}.", ".999999999."
    )
    killed.mkdir()
    augmenting = dataclasses.replace(config, train=dataclasses.replace(config.train, augment=True))
    with pytest.raises(InputError, match="one view per image"):
        _train(augmenting)  # the cache has one view: refused once the data is loaded
    assert list(config.runs_dir.iterdir()) == [killed]
    with claim_run(config.runs_dir / "r", force=False) as tmp:  # the next run of that name clears it away
        assert sorted(config.runs_dir.iterdir()) == sorted([tmp, config.runs_dir / ".r.lock"])


def test_evaluate_with_a_model_that_fails_to_load_is_one_line(trained, tmp_path, capsys):
    import keras

    config, run_dir = trained
    copy = shutil.copytree(run_dir, tmp_path / "run")
    dim = read_attrs(cache_path(config.cache_dir, "offline_cnn"))["backbone_config"]["resolved"]["dim"]
    x = keras.Input((dim,), name="offline_cnn")
    out = keras.layers.Dense(14, activation="sigmoid")(keras.layers.Lambda(lambda t: t * 2)(x))
    keras.Model(x, out).save(copy / "model.keras")  # Lambda layers are refused when loading safely
    args = ["evaluate", "--config", str(config.path), "--run", str(copy)]
    assert run.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "cannot be loaded (ValueError" in error and "\n" not in error
