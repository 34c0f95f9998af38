"""extract.importing / extract.imported: embedding files in each published layout, imported, train a head
exactly as the same vectors written straight to the store; bad input is one line naming file and id; a
backbone pre-trained on ChestX-ray14 marks every result."""

import dataclasses
import json

import h5py
import numpy as np
import pandas as pd
import pytest

from cache.status import Status
from cache.store import cache_path, read_features
from cxr14.caveats import SEEN_NOTICE, SYNTHETIC_NOTICE, run_notice, saw_chestxray14
from cxr14.errors import InputError
from dataset.settings import LABELS
from experiments.config import load_config
from experiments.leaderboard import leaderboard
from extract.imported import open_source, read_parquet
from extract.importing import ImportSettings, format_import, import_features
from extract.settings import BackboneConfig
from heads.data import load_head_data
from heads.settings import HeadConfig
from tests.fixtures import FAST, make_index, make_splits, train_quickly, write_cache

DIM = 8
LINEAR = HeadConfig(kind="linear")


@pytest.fixture(scope="module")
def index():
    return make_index(150)


@pytest.fixture(scope="module")
def vectors(index):
    """Per image a vector that carries the labels, rounded to float16 so every layout stores it exactly."""
    rng = np.random.default_rng(0)
    signal = index.labels @ rng.standard_normal((len(LABELS), DIM))
    return (signal + 0.5 * rng.standard_normal((len(index), DIM))).astype(np.float16).astype(np.float32)


def _tokens(vectors: np.ndarray, count: int) -> np.ndarray:
    """(N, count, D) tokens whose mean is exactly `vectors`: pairs of +-0.5 and +-0.25 around them."""
    offsets = np.array([0.5, -0.5, 0.25, -0.25][:count], dtype=np.float32)
    return vectors[:, None, :] + offsets[None, :, None]


def _ids(index, *, png: bool) -> list[str]:
    return [name if png else name[:-4] for name in index.names]


def _write_npz(path, ids, rows):
    np.savez(path, **dict(zip(ids, rows, strict=True)))
    return path


def _write_v1_npz(folder, ids, rows):
    folder.mkdir()
    for image, row in zip(ids, rows, strict=True):
        np.savez(folder / f"{image}.npz", embedding=row)
    return folder


def _write_v1_tfrecord(folder, ids, rows):
    import tensorflow as tf

    folder.mkdir()
    for image, row in zip(ids, rows, strict=True):
        feature = {"embedding": tf.train.Feature(float_list=tf.train.FloatList(value=row.tolist()))}
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        with tf.io.TFRecordWriter(str(folder / f"{image}.tfrecord")) as writer:
            writer.write(example.SerializeToString())
    return folder


def _write_hdf5(path, ids, rows, *, key="elixrc/Embedding"):
    with h5py.File(path, "w") as f:
        for image, row in zip(ids, rows, strict=True):
            f.create_group(image).create_dataset(key, data=row)
    return path


def _write_npy(folder, ids, rows, *, header="Image Index"):
    folder.mkdir()
    np.save(folder / "emb.npy", np.asarray(rows))
    lines = ([header] if header else []) + list(ids)
    (folder / "names.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "emb.npy", folder / "names.csv"


def _import(tmp_path, source, index, *, name="imp", **settings):
    return import_features(
        source,
        settings=ImportSettings(name=name, **settings),
        index_names=list(index.names),
        cache_dir=tmp_path / "features",
        force=False,
    )


def _head_predictions(tmp_path, index, backbone, *, run):
    data = load_head_data(
        cache_dir=tmp_path / "features",
        backbones=[backbone],
        index=index,
        splits=make_splits(index),
        metadata=False,
    )
    train_quickly(tmp_path / run, data, head=LINEAR, train=dataclasses.replace(FAST, epochs=2))
    return pd.read_csv(tmp_path / run / "predictions.csv"), data


def _layout_source(kind, tmp_path, index, vectors):
    """(Source, the vectors the import should yield) for one layout."""
    if kind == "npz-tokens":  # CXR Foundation: keyed by id without .png, 32 x 128 tokens (here 4 x 8)
        return open_source(
            _write_npz(tmp_path / "e.npz", _ids(index, png=False), _tokens(vectors, 4))
        ), vectors
    if kind == "v1-npz":
        return open_source(_write_v1_npz(tmp_path / "v1", _ids(index, png=False), vectors)), vectors
    if kind == "v1-tfrecord":
        return open_source(_write_v1_tfrecord(tmp_path / "v1", _ids(index, png=True), vectors)), vectors
    if kind == "hdf5":  # ELIXR-C: [1, 8, 8, 1376] per image (here 1 x 2 x 2 x 8)
        tokens = _tokens(vectors, 4).reshape(len(vectors), 1, 2, 2, DIM)
        path = _write_hdf5(tmp_path / "e.h5", _ids(index, png=True), tokens)
        return open_source(path, key="elixrc/Embedding"), vectors
    if kind == "npy":
        matrix, names = _write_npy(tmp_path / "npy", _ids(index, png=False), vectors)
        return open_source(matrix, names=names), vectors
    if kind == "npy-bare-names":
        matrix, names = _write_npy(tmp_path / "npy", _ids(index, png=True), vectors, header="")
        return open_source(matrix, names=names), vectors
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["npz-tokens", "v1-npz", "v1-tfrecord", "hdf5", "npy", "npy-bare-names"])
def test_each_layout_trains_the_head_as_vectors_written_to_the_store(tmp_path, index, vectors, kind):
    source, expected = _layout_source(kind, tmp_path, index, vectors)
    summary = _import(tmp_path, source, index)
    assert summary.rows == len(index) and summary.without_row == 0 and summary.unplaced == 0
    write_cache(tmp_path / "features", "direct", names=index.names, features=expected.astype(np.float16))
    stored = read_features(cache_path(tmp_path / "features", "imp"), names=list(index.names))
    np.testing.assert_array_equal(stored.features, expected.astype(np.float16))
    assert (stored.status == Status.OK).all()
    imported, _ = _head_predictions(tmp_path, index, "imp", run="imported")
    direct, _ = _head_predictions(tmp_path, index, "direct", run="direct")
    pd.testing.assert_frame_equal(imported, direct)


def test_parquet_with_one_vector_column_or_many(tmp_path, index, vectors):
    pytest.importorskip("pyarrow")
    ids = _ids(index, png=False)
    pd.DataFrame({"image": ids, "emb": list(vectors)}).to_parquet(tmp_path / "one.parquet")
    wide = pd.DataFrame(vectors, columns=[f"v{i}" for i in range(DIM)])
    wide.insert(0, "Image Index", _ids(index, png=True))
    wide.to_parquet(tmp_path / "many.parquet")
    _import(tmp_path, open_source(tmp_path / "one.parquet", id_column="image"), index, name="one")
    _import(tmp_path, open_source(tmp_path / "many.parquet"), index, name="many")
    for name in ("one", "many"):
        stored = read_features(cache_path(tmp_path / "features", name), names=list(index.names))
        np.testing.assert_array_equal(stored.features, vectors.astype(np.float16))


def test_parquet_without_its_engine_names_the_extra_to_install(tmp_path, monkeypatch):
    def no_engine(*args, **kwargs):
        raise ImportError("Unable to find a usable engine; tried using: 'pyarrow', 'fastparquet'.")

    monkeypatch.setattr(pd, "read_parquet", no_engine)
    (tmp_path / "e.parquet").write_bytes(b"PAR1")
    with pytest.raises(InputError, match=r"e\.parquet: reading parquet needs .*pandas\[parquet\]"):
        read_parquet(tmp_path / "e.parquet")


def test_flatten_keeps_every_token_and_the_file_records_its_origin(tmp_path, index, vectors):
    tokens = _tokens(vectors, 2)
    path = _write_npz(tmp_path / "e.npz", _ids(index, png=False), tokens)
    summary = _import(tmp_path, open_source(path), index, tokens="flatten", dtype="float32", description="v2")
    stored = read_features(cache_path(tmp_path / "features", "imp"), names=list(index.names))
    np.testing.assert_array_equal(stored.features, tokens.reshape(len(index), -1))
    assert summary.dim == 2 * DIM and summary.row_shape == (2, DIM)
    imported = stored.attrs["imported"]
    assert imported["layout"] == "npz" and imported["options"]["tokens"] == "flatten"
    assert imported["description"] == "v2" and len(imported["sha256"]) == 64
    assert stored.attrs["fingerprint"] == summary.fingerprint and stored.attrs["pretrained_on"] == []
    # Other options, another fingerprint.
    again = _import(tmp_path, open_source(path), index, name="mean")
    assert again.fingerprint != summary.fingerprint


def test_ids_it_cannot_place_and_images_without_a_row_are_reported(tmp_path, index, vectors):
    ids = _ids(index, png=False)[5:] + ["99999999_000", "not-an-image"]
    rows = np.concatenate([vectors[5:], vectors[:2]])
    summary = _import(tmp_path, open_source(_write_npz(tmp_path / "e.npz", ids, rows)), index)
    assert summary.rows == len(index) - 5 and summary.without_row == 5
    assert summary.without_row_first == list(index.names[:5])
    assert summary.unplaced == 2 and summary.unplaced_first == ["99999999_000", "not-an-image"]
    text = format_import(summary)
    assert "5 index images have no row" in text and "2 ids are not images of the index" in text
    stored = read_features(cache_path(tmp_path / "features", "imp"))
    assert (stored.status[:5] == Status.MISSING).all() and (stored.status[5:] == Status.OK).all()
    assert stored.attrs["imported"]["unplaced"] == {"count": 2, "first": ["99999999_000", "not-an-image"]}


def _refused(tmp_path, index, source, **settings):
    with pytest.raises(InputError) as err:
        _import(tmp_path, source, index, **settings)
    message = str(err.value)
    assert "\n" not in message
    assert not cache_path(tmp_path / "features", "imp").exists()  # nothing half-written
    return message


def test_rows_of_another_shape_are_refused_naming_the_file_and_the_id(tmp_path, index, vectors):
    rows = list(vectors)
    rows[3] = np.zeros(DIM + 1, np.float32)
    path = _write_npz(tmp_path / "e.npz", _ids(index, png=False), rows)
    message = _refused(tmp_path, index, open_source(path))
    assert f"{path}: image {index.names[3][:-4]} has a float32 array of shape ({DIM + 1},)" in message


def test_nan_is_refused_naming_the_file_and_the_id(tmp_path, index, vectors):
    rows = vectors.copy()
    rows[7, 2] = np.nan
    folder = _write_v1_npz(tmp_path / "v1", _ids(index, png=True), rows)
    message = _refused(tmp_path, index, open_source(folder))
    assert (
        message
        == f"{folder / (index.names[7] + '.npz')}: image {index.names[7]} has NaN or infinite values; nothing written"
    )


def test_float16_overflow_is_refused_with_the_fix(tmp_path, index, vectors):
    rows = vectors.copy()
    rows[1, 0] = 1e6
    path = _write_npz(tmp_path / "e.npz", _ids(index, png=False), rows)
    message = _refused(tmp_path, index, open_source(path))
    assert f"image {index.names[1][:-4]} has values beyond float16's range (pass --dtype float32)" in message


def test_an_image_given_twice_is_refused(tmp_path, index, vectors):
    ids = _ids(index, png=False)
    ids[4] = index.names[3]  # 00000001_000 and 00000001_000.png: the same image
    matrix, names = _write_npy(tmp_path / "npy", ids, vectors)
    message = _refused(tmp_path, index, open_source(matrix, names=names))
    assert f"{matrix}: image {index.names[3]} appears twice" in message


def test_a_missing_id_column_is_refused_naming_the_file_and_the_column(tmp_path, index, vectors):
    matrix, names = _write_npy(tmp_path / "npy", _ids(index, png=True), vectors, header="file")
    pd.read_csv(names).assign(other=1).to_csv(names, index=False)  # two columns, neither the default
    with pytest.raises(InputError, match=rf"{names}: no id column 'Image Index' \(columns: file, other\)"):
        _import(tmp_path, open_source(matrix, names=names), index)
    with pytest.raises(InputError, match=r"no id column 'image_id'"):
        _import(tmp_path, open_source(matrix, names=names, id_column="image_id"), index)


def test_matrix_and_names_of_different_lengths_are_refused(tmp_path, index, vectors):
    matrix, names = _write_npy(tmp_path / "npy", _ids(index, png=True)[:-1], vectors)
    assert f"{len(index)} rows, but {names} names {len(index) - 1} images" in _refused(
        tmp_path, index, open_source(matrix, names=names)
    )


def test_keeping_tokens_is_refused_until_token_caches_exist(tmp_path, index, vectors):
    path = _write_npz(tmp_path / "e.npz", _ids(index, png=False), _tokens(vectors, 2))
    message = _refused(tmp_path, index, open_source(path), tokens="keep")
    assert "token caches do not exist yet; pass --tokens mean" in message


def test_hdf5_without_key_lists_what_the_groups_hold(tmp_path, index, vectors):
    path = _write_hdf5(tmp_path / "e.h5", _ids(index, png=True), vectors[:, None, :], key="elixrb/img_emb")
    assert "pass --key PATH" in _refused(tmp_path, index, open_source(path)) and "elixrb/img_emb" in _refused(
        tmp_path, index, open_source(path)
    )
    message = _refused(tmp_path, index, open_source(path, key="contrastive/img_emb"))
    assert f"image {index.names[0]} has no dataset 'contrastive/img_emb'" in message


def test_no_id_of_the_index_and_an_existing_file_are_refused(tmp_path, index, vectors):
    path = _write_npz(tmp_path / "e.npz", [f"x{i}" for i in range(len(index))], vectors)
    assert "none of its 150 ids is an image of the index (first: x0, x1, x2)" in _refused(
        tmp_path, index, open_source(path)
    )
    good = _write_npz(tmp_path / "g.npz", _ids(index, png=False), vectors)
    _import(tmp_path, open_source(good), index)
    with pytest.raises(InputError, match="exists; pass --force"):
        _import(tmp_path, open_source(good), index)


def test_pretrained_on_is_checked_and_never_part_of_the_extraction_recipe():
    table = BackboneConfig(
        name="b", source="random", image_size=32, preprocess="unit", pretrained_on=("ImageNet",)
    )
    assert "pretrained_on" not in table.as_dict()  # naming it does not invalidate existing caches
    with pytest.raises(InputError, match=r"backbones\.b\.pretrained_on"):
        BackboneConfig(name="b", source="random", image_size=32, preprocess="unit", pretrained_on=("x", "x"))
    assert saw_chestxray14({"a": ["ImageNet"], "b": ["NIH ChestX-ray14"], "c": ["chestx-ray8"], "d": []}) == [
        "b",
        "c",
    ]
    assert run_notice(synthetic=True, seen=["b"]) == f"{SYNTHETIC_NOTICE}; {SEEN_NOTICE} (b)"


def test_shipped_backbones_say_what_they_were_pretrained_on():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parent.parent / "cxr14.toml")
    for name in ("resnet_v2_50", "inception_v3", "mobilenet_v2", "densenet121"):
        assert config.backbones[name].pretrained_on == ("ImageNet",), name
    assert config.backbones["offline_cnn"].pretrained_on == ()


def test_features_pretrained_on_chestxray14_carry_the_notice_in_every_output(tmp_path, index, vectors):
    from PIL import Image

    path = _write_npz(tmp_path / "e.npz", _ids(index, png=False), vectors)
    _import(tmp_path, open_source(path), index, name="raddino", pretrained_on=("ChestX-ray14",))
    write_cache(tmp_path / "features", "plain", names=index.names, features=vectors.astype(np.float16))
    _, data = _head_predictions(tmp_path, index, "raddino", run="seen")
    assert data.seen_chestxray14 == ("raddino",)
    run = tmp_path / "seen"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["seen_chestxray14"] == ["raddino"] and SEEN_NOTICE in metrics["notice"]
    text = (run / "auc.md").read_text()
    assert SEEN_NOTICE in text.splitlines()[0] and "raddino" in text.splitlines()[0]
    assert "Wang et al. 2017" in text  # the published numbers stay, with the notice beside them
    for plot in ("roc.png", "auc.png", "calibration.png"):
        assert SEEN_NOTICE in Image.open(run / plot).text["Title"], plot
    _head_predictions(tmp_path, index, "plain", run="clean")
    board = leaderboard([tmp_path / "clean", run])
    assert SEEN_NOTICE in board.splitlines()[0]
    seen_row = next(line for line in board.splitlines() if "| seen |" in line)
    clean_row = next(line for line in board.splitlines() if "| clean |" in line)
    assert "pre-trained on ChestX-ray14" in seen_row and "pre-trained on ChestX-ray14" not in clean_row
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert clean["seen_chestxray14"] == [] and "notice" not in clean


def test_the_config_table_says_it_for_extracted_features(tmp_path, index, vectors):
    write_cache(tmp_path, "xrv", names=index.names, features=vectors.astype(np.float16))
    data = load_head_data(
        cache_dir=tmp_path,
        backbones=["xrv"],
        index=index,
        splits=make_splits(index),
        metadata=False,
        pretrained_on={"xrv": ("ChestX-ray14", "CheXpert")},
    )
    assert data.seen_chestxray14 == ("xrv",)


def test_the_command_imports_then_refuses_bad_input_in_one_line(tmp_path, tiny_project, capsys):
    import run
    from dataset.index import find_csv, read_index

    names = read_index(find_csv(tiny_project.data_dir), label_names=LABELS).names
    rows = np.random.default_rng(0).standard_normal((len(names), 4, DIM)).astype(np.float32)
    path = _write_npz(tmp_path / "cxr_foundation.npz", [n[:-4] for n in names], rows)
    base = ["import-features", str(path), "--config", str(tiny_project.path), "--cache-dir", str(tmp_path)]
    assert run.main([*base, "--name", "cxrf", "--pretrained-on", "ChestX-ray14"]) == 0
    out = capsys.readouterr().out
    assert f"imported {len(names):,} images (npz, rows of 4 x {DIM} -> {DIM})" in out
    assert read_features(cache_path(tmp_path, "cxrf")).attrs["pretrained_on"] == ["ChestX-ray14"]
    assert run.main([*base, "--name", "cxrf"]) == 2
    assert "--force" in capsys.readouterr().err
    assert run.main([*base, "--name", "flat", "--tokens", "keep"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "token caches do not exist yet" in err
    assert run.main([*base, "--name", "offline_cnn"]) == 2  # a configured backbone's name
    assert "[backbones.offline_cnn] table" in capsys.readouterr().err
