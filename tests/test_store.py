"""The feature store: schema checks, atomic writes, shards, merging, and the README's format."""

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache import store
from cache.status import Status
from cxr14.errors import InputError
from cxr14.temps import temp_path

README = Path(__file__).resolve().parents[1] / "cache" / "README.md"


def attrs_for(**extra) -> dict:
    return {
        "backbone": "tiny",
        "kind": "features",
        "dtype": "float16",
        "views": 1,
        "fingerprint": "fp",
        **extra,
    }


def sample(n=4, d=3, seed=0):
    rng = np.random.default_rng(seed)
    names = np.array([f"{i:08d}_000.png" for i in range(n)], dtype=object)
    features = rng.normal(size=(n, d)).astype(np.float32)
    status = np.zeros(n, np.int8)
    errors = np.full(n, "", dtype=object)
    return dict(names=names, features=features, status=status, errors=errors)


def test_shard_ranges_cover_every_row_once():
    assert store.shard_ranges(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert store.shard_ranges(4, 4) == [(0, 4)]
    assert store.shard_ranges(0, 3) == []
    with pytest.raises(InputError, match="shard_size"):
        store.shard_ranges(5, 0)


def test_paths_follow_the_backbone_name(tmp_path):
    assert store.cache_path(tmp_path, "rn50") == tmp_path / "rn50.h5"
    assert store.shard_dir(tmp_path, "rn50") == tmp_path / "rn50.shards"


def test_fingerprint_changes_with_every_input():
    base = dict(
        names=["a.png", "b.png"], backbone_config={"name": "x"}, preprocess={"size": 8}, dtype="float16", views=1,
        shard_size=4,
    )  # fmt: skip
    reference = store.fingerprint(**base)
    assert store.fingerprint(**base) == reference
    changes = dict(
        names=["a.png", "c.png"], backbone_config={"name": "y"}, preprocess={"size": 9}, dtype="float32", views=2,
        shard_size=5,
    )  # fmt: skip
    for key, value in changes.items():
        assert store.fingerprint(**{**base, key: value}) != reference, key


def test_write_then_read_round_trips_and_converts_dtype(tmp_path):
    data = sample()
    attrs = attrs_for(backbone_config={"name": "tiny", "width": 8}, versions={"numpy": "2"})
    path = store.write_features(tmp_path / "f.h5", attrs=attrs, **data)
    got = store.read_features(path)
    assert got.features.dtype == np.float16
    np.testing.assert_array_equal(got.features, data["features"].astype(np.float16))
    assert list(got.names) == list(data["names"])
    assert got.status.dtype == np.int8 and got.attrs["schema_version"] == store.SCHEMA_VERSION
    assert got.attrs["backbone_config"] == {"name": "tiny", "width": 8}
    assert got.attrs["versions"] == {"numpy": "2"} and got.attrs["created"]
    assert [p.name for p in tmp_path.iterdir()] == ["f.h5"]  # no temporary file left behind


def test_stored_layout_matches_the_readme(tmp_path):
    path = store.write_features(tmp_path / "f.h5", attrs=attrs_for(backbone_config={"a": 1}), **sample())
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"names", "features", "status", "errors"}
        assert h5py.check_string_dtype(f["names"].dtype).encoding == "utf-8"
        assert h5py.check_string_dtype(f["errors"].dtype).encoding == "utf-8"
        assert f["features"].dtype == np.float16 and f["status"].dtype == np.int8
        assert f["features"].compression is None
        assert isinstance(f.attrs["backbone_config"], str)  # dicts are JSON strings
    for key in store.REQUIRED_ATTRS:
        assert f"`{key}`" in README.read_text()
    for status in Status:  # the README's table of status codes is the enum's
        assert re.search(rf"\|\s*{status.value}\s*\|\s*`{status.name}`\s*\|", README.read_text()), status


def test_readme_example_writes_a_readable_file(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    got = store.read_features(tmp_path / "my_model.h5")
    assert got.features.shape == (3, 768) and got.attrs["backbone"] == "my_model"
    assert list(got.status) == [Status.OK, Status.OK, Status.MISSING]


def test_read_by_names_keeps_their_order_and_marks_absent_ones(tmp_path):
    data = sample()
    path = store.write_features(tmp_path / "f.h5", attrs=attrs_for(), **data)
    got = store.read_features(path, names=[data["names"][2], "zzz.png", data["names"][0]])
    expected = data["features"].astype(np.float16)
    np.testing.assert_array_equal(got.features[0], expected[2])
    np.testing.assert_array_equal(got.features[2], expected[0])
    assert not got.features[1].any()
    assert list(got.status) == [Status.OK, Status.MISSING, Status.OK]
    assert list(got.errors) == ["", "not in cache", ""]


def test_views_and_pixels_shapes(tmp_path):
    data = sample()
    views = dict(data, features=np.zeros((4, 2, 3), np.float32))
    store.write_features(tmp_path / "v.h5", attrs=attrs_for(views=2), **views)
    assert store.read_features(tmp_path / "v.h5").features.shape == (4, 2, 3)
    pixels = dict(data, features=np.full((4, 5, 5), 7, np.uint8))
    store.write_features(tmp_path / "p.h5", attrs=attrs_for(kind="pixels", dtype="uint8"), **pixels)
    assert store.read_features(tmp_path / "p.h5").features.dtype == np.uint8
    with pytest.raises(InputError, match="views=2"):
        store.write_features(tmp_path / "bad.h5", attrs=attrs_for(views=2), **data)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d, a: d.update(status=np.array([0, 0, 0, 9], np.int8)), "status codes \\[9\\]"),
        (lambda d, a: d.update(errors=d["errors"][:3]), "'errors' has 3 rows"),
        (lambda d, a: d["names"].__setitem__(1, d["names"][0]), "duplicate"),
        (lambda d, a: a.pop("kind"), "kind"),
        (lambda d, a: a.update(dtype="int32"), "dtype='int32'"),
        (lambda d, a: a.update(schema_version=99), "schema_version 99"),
    ],
)
def test_bad_content_is_refused_and_the_old_file_kept(tmp_path, change, message):
    path = store.write_features(tmp_path / "f.h5", attrs=attrs_for(), **sample())
    data, attrs = sample(seed=1), attrs_for()
    change(data, attrs)
    with pytest.raises(InputError, match=message):
        store.write_features(path, attrs=attrs, **data)
    np.testing.assert_array_equal(store.read_features(path).features, sample()["features"].astype(np.float16))


def test_unknown_schema_or_foreign_file_is_refused_on_read(tmp_path):
    path = store.write_features(tmp_path / "f.h5", attrs=attrs_for(), **sample())
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 1  # a cache from before the rows' checksums
    with pytest.raises(
        InputError, match="schema_version 1.*version 2 added the rows' checksums.*extract it again"
    ):
        store.read_features(path)
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1]
    with pytest.raises(InputError, match="no 'schema_version'"):
        store.read_attrs(tmp_path / "foreign.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(InputError, match="cannot be read as HDF5"):
        store.read_features(tmp_path / "text.h5")
    with pytest.raises(InputError, match="no such feature file; extract it first"):
        store.read_features(tmp_path / "absent.h5")


def test_file_without_a_dataset_is_refused(tmp_path):
    path = store.write_features(tmp_path / "f.h5", attrs=attrs_for(), **sample())
    with h5py.File(path, "a") as f:
        del f["status"]
    with pytest.raises(InputError, match="dataset 'status' is missing"):
        store.read_features(path)
    with pytest.raises(InputError, match="dataset 'status' is missing"):
        store.read_status(path)


def write_all_shards(directory, data, *, shard_size, fingerprint="fp", skip=()):
    n = len(data["names"])
    for start, stop in store.shard_ranges(n, shard_size):
        if (start, stop) in skip:
            continue
        part = {key: value[start:stop] for key, value in data.items()}
        attrs = attrs_for(fingerprint=fingerprint, shard_size=shard_size)
        store.write_shard(directory, start=start, stop=stop, total_rows=n, attrs=attrs, **part)


def test_shards_merge_into_the_same_content_as_one_file(tmp_path):
    data = sample(n=7)
    data["status"][3], data["errors"][3] = Status.EMPTY, "empty file"
    write_all_shards(tmp_path / "s", data, shard_size=3)
    (tmp_path / "s" / ".000000000-000000003.h5.123.tmp").write_bytes(b"half a shard")  # a killed writer
    assert set(store.finished_shards(tmp_path / "s", wanted=attrs_for())) == {(0, 3), (3, 6), (6, 7)}
    merged = store.read_features(store.merge_shards(tmp_path / "s", out_path=tmp_path / "m.h5"))
    np.testing.assert_array_equal(merged.features, data["features"].astype(np.float16))
    assert list(merged.names) == list(data["names"]) and list(merged.errors) == list(data["errors"])
    assert merged.status[3] == Status.EMPTY
    assert not any(key in merged.attrs for key in store.SHARD_ATTRS)
    names, status, errors = store.read_status(tmp_path / "m.h5")
    assert list(status) == list(data["status"]) and errors[3] == "empty file"


def test_merge_refuses_missing_or_mixed_shards(tmp_path):
    data = sample(n=7)
    write_all_shards(tmp_path / "s", data, shard_size=3, skip={(3, 6)})
    with pytest.raises(InputError, match="1 of 3 shards are not finished yet \\(rows 3-6"):
        store.merge_shards(tmp_path / "s", out_path=tmp_path / "m.h5")
    write_all_shards(tmp_path / "s", data, shard_size=3, fingerprint="other", skip={(0, 3), (6, 7)})
    with pytest.raises(InputError, match="2 different recipes"):
        store.merge_shards(tmp_path / "s", out_path=tmp_path / "m.h5")
    with pytest.raises(store.MadeDifferently, match="made differently from this run.*; start over"):
        store.finished_shards(tmp_path / "s", wanted=attrs_for())
    assert not (tmp_path / "m.h5").exists()
    with pytest.raises(InputError, match="no finished shards"):
        store.merge_shards(tmp_path / "empty", out_path=tmp_path / "m.h5")


def test_discard_keeps_only_matching_shards_of_other_workers(tmp_path):
    data = sample(n=7)
    write_all_shards(tmp_path / "s", data, shard_size=3)
    write_all_shards(tmp_path / "s", data, shard_size=3, fingerprint="old", skip={(0, 3), (3, 6)})
    removed = store.discard_shards(tmp_path / "s", fingerprint="fp", ranges=[(0, 3)])
    assert removed == 2  # (0, 3) is ours to redo, (6, 7) was made by another recipe
    assert set(store.finished_shards(tmp_path / "s", wanted=attrs_for())) == {(3, 6)}


@pytest.mark.parametrize(
    "bad, dtype",
    [(np.nan, "float16"), (np.inf, "float32"), (1e6, "float16")],  # 1e6 overflows float16 to inf
)
def test_non_finite_features_are_refused_on_write(tmp_path, bad, dtype):
    data = sample()
    data["features"][2, 1] = bad
    with pytest.raises(InputError, match=r"1 row\(s\) are NaN or infinite \(first: 00000002_000.png\)"):
        store.write_features(tmp_path / "f.h5", attrs=attrs_for(dtype=dtype), **data)
    assert list(tmp_path.iterdir()) == []


def test_finite_rows_marks_each_row(monkeypatch):
    monkeypatch.setattr(store, "FINITE_CHUNK", 2)  # rows checked in chunks: cross a chunk boundary
    features = np.ones((5, 2, 3), np.float16)
    features[1, 0, 2], features[4, 1, 0] = np.nan, -np.inf
    assert store.finite_rows(features).tolist() == [True, False, True, True, False]
    assert store.finite_rows(np.zeros((3, 4, 4), np.uint8)).all()


def test_a_string_schema_version_says_it_is_a_string(tmp_path):
    path = store.write_features(tmp_path / "f.h5", attrs=attrs_for(), **sample())
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = "2"
    with pytest.raises(InputError) as err:
        store.read_features(path)
    assert "schema_version is the str '2'; it must be the integer 2" in str(err.value)


def _full_disk(monkeypatch, *, after: int = 0):
    """Make HDF5 dataset writes fail as on a full disk (errno 28), after `after` successful ones."""
    real = h5py.Group.create_dataset
    calls = []

    def create_dataset(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise OSError(
                28,
                "Can't synchronously write data (file write failed: time = ..., filename = 'x', "
                "errno = 28, error message = 'No space left on device')",
            )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = store.write_features(tmp_path / "f.h5", attrs=attrs_for(), **sample())
    _full_disk(monkeypatch, after=1)
    with pytest.raises(InputError) as err:
        store.write_features(path, attrs=attrs_for(), **sample(seed=1))
    message = str(err.value)
    assert message.startswith(f"no space left on device: {path}") and "\n" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["f.h5"]  # no temporary file left behind
    np.testing.assert_array_equal(store.read_features(path).features, sample()["features"].astype(np.float16))
    monkeypatch.undo()
    write_all_shards(tmp_path / "s", sample(n=7), shard_size=3)
    _full_disk(monkeypatch)
    with pytest.raises(InputError, match="^no space left on device: .*m.h5"):
        store.merge_shards(tmp_path / "s", out_path=tmp_path / "m.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "s"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_shard_write_keeps_a_live_writers_temporary_file(tmp_path):
    data = sample(n=3)
    directory = tmp_path / "s"
    directory.mkdir()
    mine = temp_path(store.shard_path(directory, 0, 3)).name
    live = directory / mine.replace(f".{os.getpid()}.tmp", f".{os.getppid()}.tmp")  # pytest's parent lives
    dead = directory / mine.replace(f".{os.getpid()}.tmp", f".{_dead_pid()}.tmp")
    live.write_bytes(b"another worker, still writing")
    dead.write_bytes(b"a killed worker's leftover")
    store.write_shard(directory, start=0, stop=3, total_rows=3, attrs=attrs_for(shard_size=3), **data)
    assert live.exists() and not dead.exists()


def test_a_killed_merges_temporary_file_is_removed_by_the_next_merge(tmp_path):
    write_all_shards(tmp_path / "s", sample(n=7), shard_size=3)
    out = tmp_path / "m.h5"
    leftover = out.with_name(temp_path(out).name.replace(f".{os.getpid()}.tmp", f".{_dead_pid()}.tmp"))
    leftover.write_bytes(b"x" * 1000)  # as large as the merged file, on the full data set
    store.merge_shards(tmp_path / "s", out_path=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5", "s"]


def test_iter_rows_reads_rows_in_the_order_asked_a_chunk_at_a_time(tmp_path):
    data = sample(n=40, d=5)
    path = store.write_features(tmp_path / "f.h5", **data, attrs=attrs_for())
    stored = store.read_features(path).features
    for rows in ([3, 4, 5, 6, 7], [9, 2, 30, 31, 0], [0, 39], list(range(40))[::-1]):
        chunks = list(store.iter_rows(path, rows, chunk=2))
        assert [len(c) for c in chunks] == [2] * (len(rows) // 2) + [1] * (len(rows) % 2)
        np.testing.assert_array_equal(np.concatenate(chunks), stored[rows])
    assert list(store.iter_rows(path, [], chunk=2)) == []


# Family: the store proves its rows are the rows it wrote.


def _one_line_naming(err, path, *words):
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize(
    "dataset, edit",
    [
        ("features", lambda v: np.roll(v, 1, axis=0)),  # names untouched, every row its neighbour's
        ("status", lambda v: np.roll(v, 1)),
        ("errors", lambda v: np.roll(v, 1)),
    ],
)
def test_rows_changed_after_writing_are_refused_naming_the_file(tmp_path, dataset, edit):
    data = sample(n=6)
    data["status"][2], data["errors"][2] = Status.EMPTY, "empty file"
    path = store.write_features(tmp_path / "f.h5", attrs=attrs_for(), **data)
    with h5py.File(path, "a") as f:
        stored = f[dataset].asstr()[()].astype(object) if dataset == "errors" else f[dataset][()]
        f[dataset][...] = edit(stored)
    with pytest.raises(store.MadeDifferently) as err:
        store.read_features(path)
    _one_line_naming(err, path, f"its {dataset} do not match the checksums", "extract it again")
    if dataset != "features":  # the summary reader checks the columns it reads
        with pytest.raises(store.MadeDifferently, match=f"its {dataset} do not match"):
            store.read_status(path)
    with pytest.raises(store.MadeDifferently, match=f"its {dataset} do not match"):
        store.check_rows(path, chunk=4)  # streamed across chunk boundaries


def test_checksums_are_the_stores_own_and_survive_a_merge(tmp_path):
    data = sample(n=7)
    whole = store.write_features(tmp_path / "w.h5", attrs=attrs_for(checksums={"features": "0"}), **data)
    expected = store.read_attrs(whole)["checksums"]
    assert expected["features"] != "0"  # a given value is replaced, never trusted
    write_all_shards(tmp_path / "s", data, shard_size=3)
    merged = store.merge_shards(tmp_path / "s", out_path=tmp_path / "m.h5")
    assert store.read_attrs(merged)["checksums"] == expected  # streamed shard by shard, same digests
    store.check_rows(merged, chunk=2)
    with h5py.File(merged, "a") as f:
        del f.attrs["checksums"]
    with pytest.raises(InputError, match="attribute checksums missing"):
        store.read_features(merged)


# Family: memory bounded by the work, not by a header.


def _declaring(path, *, features_shape, rows=None, dtype="float16", chunks=True):
    """A file whose `features` declares `features_shape` but stores nothing (HDF5 allocates lazily)."""
    rows = features_shape[0] if rows is None else rows
    with h5py.File(path, "w") as f:
        f.create_dataset("names", data=[f"{i:08d}_000.png" for i in range(rows)], dtype=h5py.string_dtype())
        f.create_dataset("features", shape=features_shape, dtype=dtype, chunks=chunks or None)
        f.create_dataset("status", data=np.zeros(rows, np.int8))
        f.create_dataset("errors", data=[""] * rows, dtype=h5py.string_dtype())
        f.attrs.update(schema_version=2, backbone="big", kind="features", dtype=dtype, views=1)
        f.attrs["checksums"] = '{"names": "0", "features": "0", "status": "0", "errors": "0"}'
    return path


def test_a_small_file_declaring_a_huge_array_is_refused_before_reading(tmp_path, monkeypatch):
    path = _declaring(tmp_path / "bomb.h5", features_shape=(300, 10**7))
    assert path.stat().st_size < 32 * 1024
    reads = []
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda *a: reads.append(a))  # nothing may be read
    for reader in (store.read_features, store.read_status, store.check_rows):
        with pytest.raises(InputError) as err:
            reader(path)
        _one_line_naming(err, path, "(300, 10000000)", "wider than the 65,536")
    assert reads == []


def test_declared_rows_storage_and_memory_are_checked(tmp_path, monkeypatch):
    rows = _declaring(tmp_path / "rows.h5", features_shape=(40, 8), rows=4)
    with pytest.raises(InputError, match="'features' declares 40 rows but 'names' has 4"):
        store.read_features(rows)
    unwritten = _declaring(tmp_path / "unwritten.h5", features_shape=(4, 8))
    with pytest.raises(
        InputError, match="declare 64 bytes but the file stores 0; it was never written whole"
    ):
        store.read_features(unwritten)
    path = store.write_features(tmp_path / "f.h5", attrs=attrs_for(), **sample(n=1000, d=64))
    monkeypatch.setattr("cache.limits.available_memory", lambda: 100_000)
    with pytest.raises(InputError) as err:
        store.read_features(path)
    _one_line_naming(err, path, "GiB of memory is available")
    assert len(list(store.iter_rows(path, [0, 1], chunk=2))) == 1  # a chunk at a time fits


# Family: hand-edited or foreign files are one line naming the file and the key.


def _rewrite(path, key, value):
    with h5py.File(path, "a") as f:
        if key in f:
            del f[key]
            f[key] = value
        else:
            f.attrs[key] = value


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("backbone_config", "{not json", ["attribute backbone_config is not JSON"]),
        ("preprocess", "[1, 2]", ["attribute preprocess is the list", "JSON object"]),
        ("kind", np.array([b"features", b"pixels"]), ["attribute kind is the ndarray", "a string"]),
        ("views", "1", ["attribute views is the str '1'", "an integer"]),
        ("shard_size", True, ["attribute shard_size is the bool", "an integer"]),
        ("names", np.arange(4), ["'names' holds int64", "1-D string"]),
        ("features", np.float16(1.0), ["features have shape ()"]),
        ("status", np.array(["0", "0", "0", "0"], dtype=h5py.string_dtype()), ["'status' holds", "integer"]),
    ],
)
def test_a_hand_edited_file_is_one_line_naming_the_file_and_key(tmp_path, key, value, words):
    path = store.write_features(tmp_path / "f.h5", attrs=attrs_for(), **sample())
    _rewrite(path, key, value)
    with pytest.raises(InputError) as err:
        store.read_features(path)
    _one_line_naming(err, path, *words)


def test_missing_attributes_and_groups_are_named(tmp_path):
    path = store.write_features(tmp_path / "f.h5", attrs=attrs_for(), **sample())
    with h5py.File(path, "a") as f:
        del f.attrs["views"]
    with pytest.raises(InputError) as err:
        store.read_attrs(path)
    _one_line_naming(err, path, "['views'] missing")
    path = store.write_features(tmp_path / "g.h5", attrs=attrs_for(), **sample())
    with h5py.File(path, "a") as f:
        del f["features"]
        f.create_group("features")
    with pytest.raises(InputError) as err:
        store.read_features(path)
    _one_line_naming(err, path, "'features' is an HDF5 group")


# Family: a refusal says what is wrong.


def test_a_folder_where_a_feature_file_belongs_is_called_a_folder(tmp_path):
    folder = tmp_path / "bb.h5"
    folder.mkdir()
    for reader in (store.read_features, store.read_attrs, store.read_status):
        with pytest.raises(InputError, match="bb.h5 is a folder, not a feature file"):
            reader(folder)
    with pytest.raises(InputError, match="bb.h5 is a folder, not a feature file"):
        store.write_features(folder, attrs=attrs_for(), **sample())
    assert folder.is_dir() and not any(folder.iterdir())
