"""heads.data: cached features joined to the index by name; failed and absent rows counted, bad caches refused."""

import dataclasses
import json

import h5py
import numpy as np
import pytest

from cache.checksums import checksums
from cache.origin import index_fingerprint
from cache.status import Status
from cache.store import cache_path, shard_dir
from cxr14.errors import Fix, InputError
from dataset.settings import LABELS
from heads.data import METADATA_COLUMNS, encode_metadata, load_head_data
from tests.fixtures import make_index, make_splits, signal_features, write_cache


@pytest.fixture
def index():
    return make_index()


def test_rows_are_joined_by_name_not_position(tmp_path, index):
    features = signal_features(index)
    order = np.random.default_rng(1).permutation(len(index))
    write_cache(tmp_path / "a", "bb", names=index.names, features=features)
    write_cache(tmp_path / "b", "bb", names=index.names[order], features=features[order])
    splits = make_splits(index)
    in_order = load_head_data(
        cache_dir=tmp_path / "a", backbones=["bb"], index=index, splits=splits, metadata=False
    )
    shuffled = load_head_data(
        cache_dir=tmp_path / "b", backbones=["bb"], index=index, splits=splits, metadata=False
    )
    np.testing.assert_array_equal(shuffled.features["bb"], features)
    np.testing.assert_array_equal(shuffled.features["bb"], in_order.features["bb"])
    np.testing.assert_array_equal(shuffled.names, index.names)
    np.testing.assert_array_equal(shuffled.labels, index.labels.astype(np.float32))
    np.testing.assert_array_equal(shuffled.split, splits.assignment)
    assert shuffled.split_source == "patient-random" and shuffled.label_names == index.label_names
    assert shuffled.excluded == {
        "failed_extraction": 0,
        "not_finite": 0,
        "not_in_cache": 0,
        "not_in_index": 0,
        "no_split": 0,
    }


def test_failed_absent_and_unknown_rows_are_counted(tmp_path, index):
    features = signal_features(index)
    status = np.zeros(len(index), np.int8)
    status[[0, 5]] = Status.UNDECODABLE
    status[7] = Status.TRUNCATED
    keep = np.ones(len(index), bool)
    keep[[10, 11]] = False  # never extracted
    names = np.concatenate([index.names[keep], ["stranger_000.png"]]).astype(object)
    stored = np.concatenate([features[keep], np.ones((1, features.shape[1]), np.float16)])
    write_cache(tmp_path, "bb", names=names, features=stored, status=np.append(status[keep], 0))
    data = load_head_data(
        cache_dir=tmp_path, backbones=["bb"], index=index, splits=make_splits(index), metadata=False
    )
    assert data.excluded == {
        "failed_extraction": 3,
        "not_finite": 0,
        "not_in_cache": 2,
        "not_in_index": 1,
        "no_split": 0,
    }
    dropped = [0, 5, 7, 10, 11]
    expected = np.delete(np.arange(len(index)), dropped)
    np.testing.assert_array_equal(data.names, index.names[expected])
    np.testing.assert_array_equal(data.features["bb"], features[expected])
    np.testing.assert_array_equal(data.patients, index.patients[expected])
    assert "115 images" in data.describe() and "failed_extraction 3" in data.describe()


def test_rows_with_non_finite_features_are_left_out_and_counted(tmp_path, index):
    """A file written by other tools may hold NaN or inf: such rows would make every score constant."""
    features = signal_features(index)
    features[3, 0], features[8, 5], features[9] = np.nan, np.inf, -np.inf
    status = np.zeros(len(index), np.int8)
    status[9] = Status.EMPTY  # a failed row is counted as failed, whatever it holds
    with h5py.File(cache_path(tmp_path, "bb"), "w") as f:  # the store itself refuses to write these
        f.create_dataset("names", data=index.names.astype(str).tolist(), dtype=h5py.string_dtype())
        f.create_dataset("features", data=features)
        f.create_dataset("status", data=status)
        f.create_dataset("errors", data=[""] * len(index), dtype=h5py.string_dtype())
        f.attrs.update(schema_version=2, backbone="bb", kind="features", dtype="float16", views=1)
        rows = dict(names=index.names, features=features, status=status, errors=[""] * len(index))
        f.attrs["checksums"] = json.dumps(checksums(**rows))
    data = load_head_data(
        cache_dir=tmp_path, backbones=["bb"], index=index, splits=make_splits(index), metadata=False
    )
    assert data.excluded["not_finite"] == 2 and data.excluded["failed_extraction"] == 1
    assert np.isfinite(data.features["bb"]).all() and len(data.names) == len(index) - 3
    assert "not_finite 2" in data.describe()


def test_ensemble_keeps_images_ok_in_every_cache(tmp_path, index):
    a, b = signal_features(index, dim=8, seed=1), signal_features(index, dim=4, seed=2).astype(np.float32)
    status_a = np.zeros(len(index), np.int8)
    status_a[3] = Status.EMPTY
    status_b = np.zeros(len(index), np.int8)
    status_b[[3, 4]] = Status.MISSING
    write_cache(tmp_path, "a", names=index.names, features=a, status=status_a)
    order = np.arange(len(index))[::-1]
    write_cache(tmp_path, "b", names=index.names[order], features=b[order], status=status_b[order])
    data = load_head_data(
        cache_dir=tmp_path, backbones=["a", "b"], index=index, splits=make_splits(index), metadata=False
    )
    expected = np.delete(np.arange(len(index)), [3, 4])
    np.testing.assert_array_equal(data.features["a"], a[expected])
    np.testing.assert_array_equal(data.features["b"], b[expected])
    assert data.features["b"].dtype == np.float32
    # A MISSING status recorded by extraction counts as failed; a row failing twice counts once.
    assert data.excluded["failed_extraction"] == 2
    assert "a and b" in data.describe()


def test_metadata_columns(tmp_path, index):
    write_cache(tmp_path, "bb", names=index.names, features=signal_features(index))
    splits = make_splits(index)
    data = load_head_data(cache_dir=tmp_path, backbones=["bb"], index=index, splits=splits, metadata=True)
    assert data.metadata.shape == (len(index), len(METADATA_COLUMNS))
    fill = np.median(index.age[(splits.assignment == "train") & ~np.isnan(index.age)])
    np.testing.assert_allclose(
        data.metadata[0],
        [
            fill / 100,
            1,
            index.sex[0] == "M",
            index.sex[0] == "F",
            index.view[0] == "PA",
            index.view[0] == "AP",
        ],
        rtol=1e-6,
    )
    np.testing.assert_allclose(data.metadata[1, :2], [index.age[1] / 100, 0], rtol=1e-6)
    encoded = encode_metadata(
        age=np.array([30.0, np.nan]), sex=np.array(["F", "M"]), view=np.array(["AP", "PA"]), fill_age=50.0
    )
    np.testing.assert_allclose(encoded, [[0.3, 0, 0, 1, 0, 1], [0.5, 1, 1, 0, 1, 0]], rtol=1e-6)


def test_no_cache_names_the_extract_command(tmp_path, index):
    with pytest.raises(InputError, match="no feature cache for backbone 'resnet'.*extract it first") as err:
        load_head_data(
            cache_dir=tmp_path, backbones=["resnet"], index=index, splits=make_splits(index), metadata=False
        )
    assert err.value.fix == Fix("extract", {"backbone": "resnet"})
    shard_dir(tmp_path, "resnet").mkdir()
    with pytest.raises(InputError, match="not merged yet") as err:
        load_head_data(
            cache_dir=tmp_path, backbones=["resnet"], index=index, splits=make_splits(index), metadata=False
        )
    assert err.value.fix == Fix("merge", {"backbone": "resnet"})


def test_unknown_schema_version_is_refused(tmp_path, index):
    path = write_cache(tmp_path, "bb", names=index.names, features=signal_features(index))
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(InputError, match="schema_version 99"):
        load_head_data(
            cache_dir=tmp_path, backbones=["bb"], index=index, splits=make_splits(index), metadata=False
        )


def test_missing_attributes_are_refused(tmp_path, index):
    path = write_cache(tmp_path, "bb", names=index.names, features=signal_features(index))
    with h5py.File(path, "r+") as f:
        del f.attrs["kind"]
    with pytest.raises(InputError, match="kind"):
        load_head_data(
            cache_dir=tmp_path, backbones=["bb"], index=index, splits=make_splits(index), metadata=False
        )


def test_cache_of_other_images_is_refused(tmp_path, index):
    other = make_index(30)
    names = np.array([f"x{n}" for n in other.names], dtype=object)
    write_cache(tmp_path, "bb", names=names, features=signal_features(other))
    with pytest.raises(InputError, match="none of its 30 image names"):
        load_head_data(
            cache_dir=tmp_path, backbones=["bb"], index=index, splits=make_splits(index), metadata=False
        )


def test_all_rows_failed_is_an_error(tmp_path, index):
    status = np.full(len(index), Status.UNDECODABLE, np.int8)
    write_cache(tmp_path, "bb", names=index.names, features=signal_features(index), status=status)
    with pytest.raises(InputError, match="no image has features"):
        load_head_data(
            cache_dir=tmp_path, backbones=["bb"], index=index, splits=make_splits(index), metadata=False
        )


def _load(cache_dir, index):
    return load_head_data(
        cache_dir=cache_dir, backbones=["bb"], index=index, splits=make_splits(index), metadata=False
    )


def test_a_cache_of_another_data_set_reusing_the_names_is_refused_naming_both(tmp_path, index):
    """Same names and patients, other labels: a make-sample set of another seed, say."""
    index = dataclasses.replace(index, csv_path=tmp_path / "A" / "Data_Entry_2017.csv")
    other = dataclasses.replace(make_index(seed=1), csv_path=tmp_path / "B" / "Data_Entry_2017.csv")
    assert list(other.names) == list(index.names) and not np.array_equal(other.labels, index.labels)
    recorded = index_fingerprint(index, rows=np.arange(len(index)))
    path = write_cache(
        tmp_path, "bb", names=index.names, features=signal_features(index), attrs={"dataset": recorded}
    )
    assert len(_load(tmp_path, index).names) == len(index)  # its own data set joins
    with pytest.raises(InputError) as err:
        _load(tmp_path, other)
    message = str(err.value)
    assert message.startswith(f"{path} was extracted from another data set than {other.csv_path}")
    assert "the same image names, other labels Atelectasis" in message and "\n" not in message
    assert err.value.fix == Fix("extract", {"backbone": "bb", "force": True})
    moved = dataclasses.replace(other, labels=index.labels, patients=index.patients + 1)
    with pytest.raises(InputError, match="the same image names, other patients"):
        _load(tmp_path, moved)
    fewer = dataclasses.replace(index, labels=index.labels[:, 2:], label_names=index.label_names[2:])
    assert len(_load(tmp_path, fewer).label_names) == len(LABELS) - 2  # the labels it has still check out
    with pytest.raises(InputError, match="2 of its 120 images are not in it"):
        _load(tmp_path, make_index(118))


def test_a_cache_name_that_is_a_folder_is_called_a_folder(tmp_path, index):
    cache_path(tmp_path, "bb").mkdir()
    shard_dir(tmp_path, "bb").mkdir()  # even with shards beside it: it is not "not merged yet"
    with pytest.raises(InputError, match="bb.h5 is a folder, not a feature file"):
        _load(tmp_path, index)
