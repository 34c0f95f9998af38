"""Stage two on token caches: the attention and attentive heads start at the probe fitted on the mean of
the tokens, learn a signal that lives in a few tokens, save and reload, and a cache beyond the memory
budget stays on disk (tests/test_token_stream.py streams it)."""

import keras
import numpy as np
import pytest

from cxr14.errors import InputError
from heads.data import load_head_data
from heads.models import build_head, token_attention
from heads.settings import HeadConfig, TrainConfig
from heads.start import fit_start, mean_tokens
from tests.fixtures import FAST, make_index, make_splits, train_quickly, write_cache

TOKENS, CHANNELS = 16, 6
ATTENTION = HeadConfig(kind="attention", units=(16,), dropout=0.0, transition=16)
ATTENTIVE = HeadConfig(kind="attentive", units=(16,), dropout=0.0, transition=16)


def local_tokens(index, *, seed=0, strength=2.0) -> np.ndarray:
    """Noise tokens; each image's findings sit in one token at a place of its own (a nodule can be anywhere),
    as `strength` times a direction per label: pooling divides them by the number of tokens, attention
    need not."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((len(index.names), TOKENS, CHANNELS)).astype(np.float32)
    directions = rng.standard_normal((index.labels.shape[1], CHANNELS))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    where = rng.integers(0, TOKENS, len(index.names))
    tokens[np.arange(len(where)), where] += strength * index.labels @ directions
    return tokens.astype(np.float16)


def token_data(tmp_path, *, n=360, budget=16.0, **cached):
    index = make_index(n)
    tokens = local_tokens(index)
    write_cache(tmp_path / "cache", "map", names=index.names, features=tokens, kind="tokens")
    write_cache(
        tmp_path / "cache", "pooled", names=index.names, features=tokens.mean(axis=1, dtype=np.float32)
    )
    load = dict(cache_dir=tmp_path / "cache", index=index, splits=make_splits(index), metadata=False)
    return {
        name: load_head_data(backbones=[name], token_memory_gb=budget, **load) for name in ("map", "pooled")
    }


def test_mean_tokens_is_the_pooled_vector_a_chunk_at_a_time():
    tokens = np.random.default_rng(0).standard_normal((5000, 3, 2)).astype(np.float16)
    np.testing.assert_allclose(mean_tokens(tokens), tokens.astype(np.float32).mean(axis=1), rtol=1e-6)


@pytest.mark.parametrize("head", [ATTENTION, ATTENTIVE], ids=lambda h: h.kind)
def test_an_untrained_token_head_is_the_probe_on_the_pooled_vector(tmp_path, head):
    data = token_data(tmp_path)
    rows = {split: data["map"].rows(split) for split in ("train", "val")}
    starts = {name: fit_start(d, rows=rows, max_directions=0, seed=0) for name, d in data.items()}
    np.testing.assert_allclose(starts["map"].kernel, starts["pooled"].kernel, rtol=1e-4, atol=1e-6)
    model = build_head(kind=head.kind, inputs={"map": (TOKENS, CHANNELS)}, n_labels=data["map"].labels.shape[1],
                       head=head, seed=0, start=starts["map"])  # fmt: skip
    linear = build_head(kind="linear", inputs={"pooled": (CHANNELS,)}, n_labels=data["map"].labels.shape[1],
                        head=HeadConfig(kind="linear", units=()), seed=0, start=starts["pooled"])  # fmt: skip
    got = model.predict({"map": data["map"].features["map"].astype(np.float32)}, verbose=0)
    want = linear.predict({"pooled": data["pooled"].features["pooled"].astype(np.float32)}, verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    weights = keras.ops.convert_to_numpy(
        token_attention(model, "map").token_weights(np.ones((2, TOKENS, CHANNELS)))
    )
    assert weights.shape == (2, TOKENS) and np.allclose(weights.sum(axis=1), 1.0)


@pytest.mark.parametrize("head", [ATTENTION, ATTENTIVE], ids=lambda h: h.kind)
def test_a_token_head_learns_what_pooling_dilutes_and_reloads(tmp_path, head):
    data = token_data(tmp_path, n=900)["map"]
    train = TrainConfig(**{**FAST.__dict__, "epochs": 25, "patience": 8, "lr": 3e-3})
    metrics = train_quickly(tmp_path / "run", data, head=head, train=train)
    assert metrics["val_mean_auc"] >= metrics["reference"]["val_mean_auc"] - 1e-9  # it starts at the probe
    gain = metrics["mean_auc"] - metrics["reference"]["mean_auc"]
    assert gain > 0.03, (metrics["mean_auc"], metrics["reference"]["mean_auc"])
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert token_attention(model, "map") is not None
    assert model.predict({"map": data.features["map"][:4].astype(np.float32)}, verbose=0).shape == (4, 14)


def two_maps(tmp_path, n=360):
    """Token caches of two backbones with different grids and widths, "map" (16 x 6) and "small"
    (9 x 4), each holding the findings in one token, loaded together; and "both", their pooled vectors
    side by side in one cache."""
    index = make_index(n)
    maps = {"map": local_tokens(index), "small": local_tokens(index, seed=1)[:, :9, :4]}
    for name, tokens in maps.items():
        write_cache(tmp_path / "cache", name, names=index.names, features=tokens, kind="tokens")
    both = np.concatenate([t.mean(axis=1, dtype=np.float32) for t in maps.values()], axis=1)
    write_cache(tmp_path / "cache", "both", names=index.names, features=both)
    load = dict(cache_dir=tmp_path / "cache", index=index, splits=make_splits(index), metadata=False)
    return load_head_data(backbones=list(maps), **load), load_head_data(backbones=["both"], **load)


@pytest.mark.parametrize("fusion", ["add", "concat"])
@pytest.mark.parametrize("kind", ["attention", "attentive"])
def test_a_token_head_over_two_maps_fuses_them_and_starts_as_the_probe_on_both(tmp_path, kind, fusion):
    tokens, pooled = two_maps(tmp_path)
    head = HeadConfig(kind=kind, units=(16,), dropout=0.0, transition=16, fusion=fusion)
    rows = {split: tokens.rows(split) for split in ("train", "val")}
    start = fit_start(tokens, rows=rows, max_directions=0, seed=0)
    reference = fit_start(pooled, rows=rows, max_directions=0, seed=0)
    shapes = {"map": (TOKENS, CHANNELS), "small": (9, 4)}
    model = build_head(kind=kind, inputs=shapes, n_labels=14, head=head, seed=0, start=start)
    linear = build_head(kind="linear", inputs={"both": (CHANNELS + 4,)}, n_labels=14,
                        head=HeadConfig(kind="linear", units=()), seed=0, start=reference)  # fmt: skip
    got = model.predict({n: tokens.features[n].astype(np.float32) for n in shapes}, verbose=0)
    want = linear.predict({n: f.astype(np.float32) for n, f in pooled.features.items()}, verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    fused = model.get_layer("token_fusion")
    assert isinstance(fused, keras.layers.Add if fusion == "add" else keras.layers.Concatenate)
    assert fused.output.shape[-1] == 16 * (1 if fusion == "add" else 2)
    for name in shapes:  # each map its own attention (its heatmap) and its own transition
        assert token_attention(model, name) is not None
        assert model.get_layer(f"token_transition_{name}").kernel.shape[1] == 16


def test_a_token_head_over_two_maps_learns_and_reloads(tmp_path):
    tokens, _ = two_maps(tmp_path, n=900)
    train = TrainConfig(**{**FAST.__dict__, "epochs": 25, "patience": 8, "lr": 3e-3})
    metrics = train_quickly(tmp_path / "run", tokens, head=ATTENTION, train=train)
    assert metrics["val_mean_auc"] >= metrics["reference"]["val_mean_auc"] - 1e-9
    assert metrics["mean_auc"] - metrics["reference"]["mean_auc"] > 0.03
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    given = {
        "map": tokens.features["map"][:4].astype(np.float32),
        "small": tokens.features["small"][:4].astype(np.float32),
    }
    assert model.predict(given, verbose=0).shape == (4, 14)


def test_token_inputs_and_vectors_are_not_mixed_up(tmp_path):
    with pytest.raises(InputError, match=r"attention head takes a token map \(T, C\).*output = \"map\""):
        build_head(kind="attention", inputs={"a": (8,)}, n_labels=2, head=ATTENTION, seed=0)
    with pytest.raises(InputError, match=r"fc head takes one feature vector.*attention or attentive"):
        build_head(kind="fc", inputs={"a": (4, 8)}, n_labels=2, head=HeadConfig(kind="fc"), seed=0)
    with pytest.raises(InputError, match="heads.attentive.transition = 10.*multiple of 4"):
        build_head(kind="attentive", inputs={"a": (4, 8)}, n_labels=2, head=HeadConfig(kind="attentive", transition=10), seed=0)  # fmt: skip


def test_a_token_cache_beyond_the_budget_stays_on_disk(tmp_path):
    from cache.stream import StreamedFeatures

    data = token_data(tmp_path, budget=1e-5)  # tests/test_token_stream.py trains on it
    assert isinstance(data["map"].features["map"], StreamedFeatures)
    assert data["map"].item_shape("map") == (TOKENS, CHANNELS)


def test_the_planted_local_problem_hides_its_findings_in_one_token_that_pooling_dilutes():
    from bench.planted import LOCAL_TOKENS, local_caches, local_channels, planted_index

    index, _ = planted_index(3000, seed=0)
    planted = local_caches(index.labels, channels=local_channels(256), seed=0, rng=np.random.default_rng(7))
    # The same draws without findings: what differs is the findings alone.
    blank = local_caches(0 * index.labels, channels=32, seed=0, rng=np.random.default_rng(7))
    tokens = planted["M"]
    assert tokens.shape == (3000, LOCAL_TOKENS, local_channels(256)) == (3000, 16, 32)
    np.testing.assert_allclose(planted["A"], tokens.mean(axis=1, dtype=np.float32), rtol=1e-3, atol=1e-3)
    moved = np.abs(tokens.astype(np.float32) - blank["M"]).max(axis=2) > 1e-2  # (N, T)
    sick = index.labels.any(axis=1)
    assert (moved.sum(axis=1)[sick] == 1).all() and not moved[~sick].any()
    assert len(np.unique(moved[sick].argmax(axis=1))) == LOCAL_TOKENS  # the place varies by image


PEAK_HEAD = """
import keras


def peak(inputs, *, n_labels, width=8):
    x = keras.layers.Dense(width, activation="relu")(inputs["map"])  # (batch, tokens, width)
    return keras.layers.Dense(n_labels)(keras.layers.GlobalMaxPooling1D()(x))
"""


def test_a_head_of_ones_own_takes_the_token_map_starts_at_the_probe_and_learns(tmp_path):
    path = tmp_path / "mine" / "peak_heads.py"
    path.parent.mkdir()
    path.write_text(PEAK_HEAD, encoding="utf-8")
    head = HeadConfig(kind="peak", builder=f"{path}:peak")
    data = token_data(tmp_path, n=900)
    rows = {split: data["map"].rows(split) for split in ("train", "val")}
    start = fit_start(data["map"], rows=rows, max_directions=0, seed=0)
    model = build_head(kind="peak", inputs={"map": (TOKENS, CHANNELS)}, n_labels=data["map"].labels.shape[1],
                       head=head, seed=0, start=start)  # fmt: skip
    pooled = fit_start(data["pooled"], rows=rows, max_directions=0, seed=0)
    linear = build_head(kind="linear", inputs={"pooled": (CHANNELS,)}, n_labels=data["map"].labels.shape[1],
                        head=HeadConfig(kind="linear", units=()), seed=0, start=pooled)  # fmt: skip
    got = model.predict({"map": data["map"].features["map"].astype(np.float32)}, verbose=0)
    want = linear.predict({"pooled": data["pooled"].features["pooled"].astype(np.float32)}, verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-4)  # untrained, it is the probe on the tokens' mean
    train = TrainConfig(**{**FAST.__dict__, "epochs": 25, "patience": 8, "lr": 3e-3})
    metrics = train_quickly(tmp_path / "run", data["map"], head=head, train=train)
    assert metrics["val_mean_auc"] >= metrics["reference"]["val_mean_auc"] - 1e-9
    gain = metrics["mean_auc"] - metrics["reference"]["mean_auc"]
    assert gain > 0.03, (metrics["mean_auc"], metrics["reference"]["mean_auc"])  # its max finds the token
