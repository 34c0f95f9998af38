"""Token caches larger than [train] token_memory_gb: they stay on disk and are read a block at a time,
training sees every row once per epoch with its own label, the same seed gives the same batches, and
scoring a streamed cache matches scoring it loaded."""

import json

import h5py
import numpy as np
import pytest
import tensorflow as tf

from cache import stream
from cache.checksums import checksums
from cache.store import MadeDifferently
from cache.stream import StreamedFeatures, read_rows, stream_features
from cxr14.errors import InputError
from heads.data import load_head_data
from heads.models import build_head
from heads.scoring import predict_probabilities, score_run
from heads.settings import HeadConfig, TrainConfig
from heads.start import fit_start
from heads.stream import BlockBatches
from tests.fixtures import FAST, make_index, make_splits, token_data, train_quickly, write_cache

TOKENS, CHANNELS = 9, 4
ATTENTION = HeadConfig(kind="attention", units=(8,), dropout=0.0, transition=8)
TINY = 1e-5  # GB: 10 kB, less than any cache here
ROW_BYTES = TOKENS * CHANNELS * 2  # float16


def planted_tokens(index, *, seed=0) -> np.ndarray:
    """Noise tokens, each image's labels added to one token of its own."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((len(index.names), TOKENS, CHANNELS)).astype(np.float32)
    where = rng.integers(0, TOKENS, len(index.names))
    tokens[np.arange(len(where)), where] += 2.0 * index.labels @ rng.standard_normal((14, CHANNELS))
    return tokens.astype(np.float16)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 stored rows, so that a few hundred rows make many blocks and several buffers."""
    monkeypatch.setattr(stream, "BLOCK_BYTES", 16 * ROW_BYTES)


def loaded(tmp_path, *, n=300, budget=TINY, shuffled=False):
    """(index, tokens as written, HeadData) of a token cache `map`; `shuffled`: rows stored in another
    order than the index's, as a cache of one's own may hold them."""
    index = make_index(n)
    tokens = planted_tokens(index)
    order = np.random.default_rng(5).permutation(n) if shuffled else np.arange(n)
    data = token_data(tmp_path / "cache", index, tokens, order=order, token_memory_gb=budget)
    return index, tokens, data


def test_a_cache_over_the_budget_stays_on_disk_and_one_within_it_is_loaded(tmp_path, small_blocks):
    _, tokens, streamed = loaded(tmp_path / "a")
    _, _, whole = loaded(tmp_path / "b", budget=16.0)
    assert isinstance(streamed.features["map"], StreamedFeatures) and isinstance(
        whole.features["map"], np.ndarray
    )
    assert streamed.item_shape("map") == whole.item_shape("map") == (TOKENS, CHANNELS)
    rows = np.array([7, 3, 3, 250, 0])
    np.testing.assert_array_equal(streamed.features["map"][rows], tokens[rows])
    np.testing.assert_array_equal(streamed.features["map"][10:40], tokens[10:40])
    with pytest.raises(InputError, match="larger than \\[train\\] token_memory_gb.*raise token_memory_gb"):
        np.asarray(streamed.features["map"])  # a sweep's in-memory training arrays are refused by name


def test_read_rows_gives_rows_in_the_order_asked_however_scattered(tmp_path):
    values = np.arange(500 * 6, dtype=np.float16).reshape(500, 2, 3)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["x"] = values
    asked = np.r_[np.random.default_rng(0).integers(0, 500, 200), 499, 0, 0]
    with h5py.File(tmp_path / "f.h5", "r") as f:
        for block in (1, 7, 1000):
            np.testing.assert_array_equal(read_rows(f["x"], asked, block_rows=block), values[asked])


def test_a_streamed_cache_is_checked_as_a_loaded_one(tmp_path):
    index = make_index(30)
    tokens = planted_tokens(index)
    path = write_cache(tmp_path, "map", names=index.names, features=tokens, kind="tokens")
    with h5py.File(path, "r+") as f:  # a row edited behind the store's back
        f["features"][3] = f["features"][2]
    with pytest.raises(MadeDifferently, match="features do not match the checksums"):
        stream_features(path, budget_bytes=1000)


def test_a_row_holding_nan_is_left_out_and_counted_as_when_loaded(tmp_path, small_blocks):
    index = make_index(60)
    tokens = planted_tokens(index)
    path = write_cache(tmp_path / "cache", "map", names=index.names, features=tokens, kind="tokens")
    _poison_row(path, row=5)
    load = dict(cache_dir=tmp_path / "cache", backbones=["map"], index=index, splits=make_splits(index))
    streamed = load_head_data(**load, metadata=False, token_memory_gb=TINY)
    whole = load_head_data(**load, metadata=False, token_memory_gb=16.0)
    assert streamed.excluded == whole.excluded and streamed.excluded["not_finite"] == 1
    np.testing.assert_array_equal(streamed.names, whole.names)


def _poison_row(path, *, row: int) -> None:
    """NaN into one row, the checksums made to match: a file another tool wrote that way."""
    with h5py.File(path, "r+") as f:
        f["features"][row, 0, 0] = np.nan
        names, errors = (f[key].asstr()[()].astype(object) for key in ("names", "errors"))
        sums = checksums(names=names, features=f["features"][()], status=f["status"][()], errors=errors)
        f.attrs["checksums"] = json.dumps(sums, sort_keys=True)


def epoch(batches: BlockBatches, number: int) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, tokens) of one epoch, batches joined in order."""
    parts = list(batches.epoch_batches(number))
    return np.concatenate([ids for ids, _ in parts]), np.concatenate([a["map"] for _, a in parts])


def test_each_epoch_reads_every_training_row_once_with_its_own_label(tmp_path, small_blocks):
    _, tokens, data = loaded(tmp_path, shuffled=True)
    rows = data.rows("train")
    on_rows = {"map": data.features["map"].take(rows)}
    batches = BlockBatches(on_rows, batch_size=32, seed=3)
    assert len(batches.blocks) > 5 and len(batches.buffers(0)) > 2  # shuffled by block and by buffer
    names_tokens = dict(zip(make_index(300).names, tokens, strict=True))
    for number in range(2):
        ids, got = epoch(batches, number)
        np.testing.assert_array_equal(np.sort(ids), np.arange(len(rows)))  # every row once
        assert not np.array_equal(ids, np.arange(len(rows)))  # and shuffled
        want = np.stack([names_tokens[name] for name in data.names[rows][ids]])
        np.testing.assert_array_equal(got, want)  # each row's own tokens, by name
    sizes = [len(ids) for ids, _ in batches.epoch_batches(0)]
    assert all(size == 32 for size in sizes[:-1]) and sum(sizes) == len(rows)
    features, labels = next(iter(batches.dataset(data.labels[rows]).unbatch().batch(len(rows))))
    ids = features["row_ids"].numpy()
    np.testing.assert_array_equal(labels.numpy(), data.labels[rows][ids])  # labels in step with the rows
    want = np.stack([names_tokens[name] for name in data.names[rows][ids]])
    np.testing.assert_array_equal(features["map"].numpy(), want)


def test_the_same_seed_gives_the_same_batches_and_another_seed_others(tmp_path, small_blocks):
    _, _, data = loaded(tmp_path)
    on_rows = {"map": data.features["map"].take(data.rows("train"))}
    one, two, other = (BlockBatches(on_rows, batch_size=16, seed=s) for s in (1, 1, 2))
    for _ in range(2):  # two epochs, each a new order
        first, second, third = (list(b()) for b in (one, two, other))
        for (ids_a, a), (ids_b, b) in zip(first, second, strict=True):
            np.testing.assert_array_equal(ids_a, ids_b)
            np.testing.assert_array_equal(a["map"], b["map"])
        assert not np.array_equal(
            np.concatenate([i for i, _ in first]), np.concatenate([i for i, _ in third])
        )
    assert not np.array_equal(epoch(one, 0)[0], epoch(one, 1)[0])


def test_predict_on_a_streamed_cache_matches_predict_on_the_loaded_one(tmp_path, small_blocks):
    _, _, streamed = loaded(tmp_path / "a", shuffled=True)
    _, _, whole = loaded(tmp_path / "b", budget=16.0, shuffled=True)
    rows = {split: whole.rows(split) for split in ("train", "val")}
    start = fit_start(whole, rows=rows, max_directions=0, seed=0)
    np.testing.assert_allclose(
        fit_start(streamed, rows=rows, max_directions=0, seed=0).kernel, start.kernel, atol=1e-6
    )
    model = build_head(kind="attention", inputs={"map": (TOKENS, CHANNELS)}, n_labels=14, head=ATTENTION,
                       seed=0, start=start)  # fmt: skip
    everything = np.arange(len(whole.names))
    np.testing.assert_allclose(
        predict_probabilities(model, streamed, everything),
        predict_probabilities(model, whole, everything),
        atol=1e-5,
    )


def test_a_head_trains_on_a_streamed_cache_and_writes_what_a_loaded_one_writes(tmp_path, small_blocks):
    train = TrainConfig(**{**FAST.__dict__, "epochs": 3, "patience": 3})
    _, _, streamed = loaded(tmp_path / "a")
    _, _, whole = loaded(tmp_path / "b", budget=16.0)
    ran = {
        name: train_quickly(tmp_path / name / "run", data, head=ATTENTION, train=train)
        for name, data in (("a", streamed), ("b", whole), ("again", streamed))
    }
    # The same seed, the same batches: a second streamed run trains to the same history.
    assert (tmp_path / "a" / "run" / "history.csv").read_text() == (
        tmp_path / "again" / "run" / "history.csv"
    ).read_text()
    assert ran["a"].keys() == ran["b"].keys() and ran["a"]["epochs"] == ran["b"]["epochs"]
    assert ran["a"]["rows"] == ran["b"]["rows"]
    assert 0.5 < ran["a"]["mean_auc"] <= 1.0
    files = {name: sorted(p.name for p in (tmp_path / name / "run").iterdir()) for name in ran}
    assert files["a"] == files["b"] and "model.keras" in files["a"]
    # evaluate reads the streamed cache a chunk at a time and scores as on the loaded one.
    scored = {name: score_run(run_dir=tmp_path / "a" / "run", data=data, n_boot=20, seed=0)
              for name, data in (("streamed", streamed), ("whole", whole))}  # fmt: skip
    assert abs(scored["streamed"]["mean_auc"] - scored["whole"]["mean_auc"]) < 1e-6
    # Each run starts at the same probe: epoch 0 scores the same in both.
    history = {name: (tmp_path / name / "run" / "history.csv").read_text().splitlines() for name in ran}
    assert history["a"][1].split(",")[-2] == history["b"][1].split(",")[-2]


def test_augmenting_from_a_streamed_cache_is_refused_by_name(tmp_path):
    from heads.stream import check_streamable

    path = write_cache(tmp_path, "map", names=make_index(6).names, features=np.zeros((6, 2, 2), np.float16),
                       kind="tokens")  # fmt: skip
    streamed = {"map": stream_features(path, budget_bytes=10).features}
    with pytest.raises(InputError, match="map.h5.*augment"):
        check_streamable(streamed, augment=True)
    check_streamable(streamed, augment=False)


def test_what_does_not_stream_is_refused_by_name(tmp_path):
    index = make_index(6)
    views = np.zeros((6, 2, 3, 2), np.float16)
    path = write_cache(tmp_path, "map", names=index.names, features=views, kind="tokens", views=2)
    with pytest.raises(InputError, match="map.h5: a cache of kind 'tokens' with 2 views.*token_memory_gb"):
        stream_features(path, budget_bytes=10)
    flat = write_cache(tmp_path, "flat", names=index.names, features=views[:, 0], kind="tokens")
    streamed = stream_features(flat, budget_bytes=10).features
    with pytest.raises(InputError, match="flat.h5: .*streamed from disk.*a sweep"):
        tf.convert_to_tensor(streamed.take(np.arange(3)))  # what a sweep's trials trained together need


def test_chunks_outside_training_follow_the_budget_and_the_byte_size(tmp_path, monkeypatch):
    from cache.stream import CHUNK_SHARE, chunk_rows

    path = write_cache(tmp_path, "map", names=make_index(50).names, features=np.zeros((50, TOKENS, CHANNELS),
                       np.float16), kind="tokens")  # fmt: skip
    value_bytes = TOKENS * CHANNELS * 8  # a row's values as float64
    # A streamed cache: a fifth of its budget, here 20 rows' float64.
    streamed = stream_features(path, budget_bytes=int(20 * value_bytes / CHUNK_SHARE)).features
    assert chunk_rows(streamed, itemsize=8) == 20 and chunk_rows(streamed, itemsize=4) == 40
    assert chunk_rows(streamed.take(np.arange(5)), itemsize=8) == 20  # a subset keeps its budget
    # Below the budget's share, the byte size rules; and an array in memory has that alone.
    assert chunk_rows(streamed, itemsize=8, most_bytes=7 * value_bytes) == 7
    monkeypatch.setattr(stream, "CHUNK_BYTES", 3 * value_bytes)
    assert chunk_rows(np.zeros((50, TOKENS, CHANNELS), np.float16), itemsize=8) == 3
    assert chunk_rows(stream_features(path, budget_bytes=1).features, itemsize=8) == 1  # never no row


def test_the_probe_start_and_prediction_in_small_chunks_equal_them_whole(tmp_path, monkeypatch):
    from heads import scoring, start

    _, tokens, streamed = loaded(tmp_path / "a", budget=TINY)
    _, _, whole = loaded(tmp_path / "b", budget=16.0)
    rows = {split: whole.rows(split) for split in ("train", "val")}
    model = build_head(kind="attention", inputs={"map": (TOKENS, CHANNELS)}, n_labels=14, head=ATTENTION,
                       seed=0, start=fit_start(whole, rows=rows, max_directions=0, seed=0))  # fmt: skip
    everything = np.arange(len(whole.names))
    in_one = {
        "scale": start.pool_tokens(whole.features["map"], scale_rows=rows["train"])[1],
        "mean": start.mean_tokens(whole.features["map"]),
        "scores": predict_probabilities(model, whole, everything),
    }
    assert scoring.predict_rows({"map": whole.features["map"]}) >= len(everything)  # in one batch
    # Reads of at most 3 rows: the streamed cache, and the one in memory by the byte size.
    monkeypatch.setattr(stream, "CHUNK_BYTES", 3 * TOKENS * CHANNELS * 8)
    largest = []
    real_read = stream.read_rows
    monkeypatch.setattr(stream, "read_rows", lambda d, p, **k: largest.append(len(p)) or real_read(d, p, **k))
    for data in (streamed, whole):
        features = data.features["map"]
        np.testing.assert_allclose(start.pool_tokens(features, scale_rows=rows["train"])[1], in_one["scale"],
                                   rtol=1e-5)  # fmt: skip
        np.testing.assert_allclose(start.mean_tokens(features), in_one["mean"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            predict_probabilities(model, data, everything), in_one["scores"], atol=1e-6
        )
    assert largest and max(largest) <= 6  # prediction at float32: 6 rows in 3 rows' float64
    # Unchunked, the scale is numpy's own sd over every token of the training rows.
    every_token = tokens[rows["train"]].astype(np.float64).reshape(-1, CHANNELS)
    np.testing.assert_allclose(in_one["scale"], every_token.std(axis=0), rtol=1e-5)
