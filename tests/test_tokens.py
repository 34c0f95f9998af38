"""Token maps in stage one: the `output` setting, backbones that emit their map, the store's "tokens"
kind, and token extraction that survives a SIGKILL as pooled extraction does."""

import h5py
import numpy as np
import pytest
import tensorflow as tf

from cache import store
from cxr14.errors import InputError
from dataset import image_loader
from extract.backbones import load_backbone
from extract.settings import BackboneConfig
from tests.fixtures import extract, kill_mid_pass, small_pngs, token_backbone


def _cfg(**changes) -> BackboneConfig:
    base = dict(name="net", source="random", image_size=32, preprocess="unit", width=8, grid=2)
    return BackboneConfig(**(base | changes))


@pytest.fixture
def images(tmp_path):
    """10 small PNGs, one of them missing, in sorted rows."""
    names, paths = small_pngs(tmp_path / "images", 10)
    paths[4] = ""
    return names, paths


def test_output_is_a_choice_and_pooled_keeps_old_fingerprints():
    assert "output" not in _cfg().as_dict() and _cfg().kind == "features"
    assert _cfg(output="map").as_dict()["output"] == "map" and _cfg(output="map").kind == "tokens"
    with pytest.raises(InputError, match=r"backbones.net.output.*pooled.*map"):
        _cfg(output="tokens")
    with pytest.raises(InputError, match='output = "map" needs a network'):
        BackboneConfig(name="pix", source="pixels", image_size=16, preprocess="bytes", output="map")


def test_a_random_net_emits_its_grid_cells_as_tokens_of_its_pooled_vector():
    pooled, mapped = load_backbone(_cfg(grid=4)), load_backbone(_cfg(grid=4, output="map"))
    pixels = tf.constant(np.random.default_rng(1).integers(0, 256, (3, 32, 32, 1)), tf.uint8)
    vectors, tokens = pooled.fn(pixels).numpy(), mapped.fn(pixels).numpy()
    assert (mapped.kind, mapped.tokens, mapped.dim) == ("tokens", 16, 8) and tokens.shape == (3, 16, 8)
    np.testing.assert_array_equal(tokens.reshape(3, -1), vectors)  # the same cells, not flattened
    assert mapped.config["resolved"]["token_grid"] == [4, 4] and mapped.config["output"] == "map"
    # Grad-CAM's split holds for the map too: the tokens are pool(feature_map(x)).
    x = image_loader.normalize(pixels, mapped.spec)
    np.testing.assert_allclose(mapped.pool(mapped.feature_map(x)).numpy(), tokens, rtol=1e-4, atol=1e-6)


def test_a_keras_net_emits_its_last_map_row_by_row():
    cfg = _cfg(source="keras", model="MobileNetV2", weights="none", preprocess="keras", output="map")
    mapped = load_backbone(cfg)
    pooled = load_backbone(_cfg(source="keras", model="MobileNetV2", weights="none", preprocess="keras"))
    pixels = tf.constant(np.random.default_rng(2).integers(0, 256, (2, 32, 32, 1)), tf.uint8)
    tokens = mapped.fn(pixels).numpy()
    assert tokens.shape == (2, 1, 1280) and mapped.config["resolved"]["token_grid"] == [1, 1]
    # The pooled vector is the mean of the tokens: what the heads' probe fits on.
    np.testing.assert_allclose(tokens.mean(axis=1), pooled.fn(pixels).numpy(), rtol=1e-4, atol=1e-5)


def test_the_store_keeps_tokens_and_checks_their_shape(tmp_path):
    tokens = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float16)
    attrs = {"backbone": "t", "kind": "tokens", "dtype": "float16", "views": 1}
    path = store.write_features(
        tmp_path / "t.h5", names=["a", "b", "c"], features=tokens, status=[0, 0, 0], errors=["", "", ""],
        attrs=attrs,
    )  # fmt: skip
    got = store.read_features(path)
    np.testing.assert_array_equal(got.features, tokens)
    assert got.attrs["kind"] == "tokens" and set(got.attrs["checksums"]) == set(store.DATASETS)
    with pytest.raises(InputError, match=r"kind 'tokens' with views=1 needs 3 dimensions"):
        store.write_features(
            tmp_path / "u.h5", names=["a", "b", "c"], features=tokens[:, 0], status=[0, 0, 0],
            errors=["", "", ""], attrs=attrs,
        )  # fmt: skip
    with h5py.File(path, "r+") as f:  # a hand edit that drops the token axis from the declaration
        f.attrs["kind"] = "features"
    with pytest.raises(InputError, match=r"kind 'features' with views=1 needs 2 dimensions"):
        store.read_features(path)


def test_token_extraction_writes_each_image_map(images, tmp_path):
    names, paths = images
    summary = extract(names, paths, tmp_path / "cache", backbone=token_backbone())
    got = store.read_features(summary.path)
    assert got.features.shape == (10, 4, 3) and got.attrs["kind"] == "tokens" and summary.failed == 1
    backbone = token_backbone()
    for row in (0, 9):
        expected = backbone.fn(image_loader.load_image(paths[row], backbone.spec)[None]).numpy()[0]
        np.testing.assert_array_equal(got.features[row], expected.astype(np.float16))
    assert not got.features[4].any()


CHILD = """
import json, sys
from tests.fixtures import extract, token_backbone
job = json.load(open(sys.argv[1]))
extract(job["names"], job["paths"], job["cache"], backbone=token_backbone(delay=0.4), shard_size=2)
"""


def test_a_killed_token_extraction_resumes_to_identical_files(images, tmp_path):
    names, paths = images
    reference = extract(names, paths, tmp_path / "reference", backbone=token_backbone(), shard_size=2)
    shards = store.shard_dir(tmp_path / "killed", "fake_map")
    job = {"names": names, "paths": paths, "cache": str(tmp_path / "killed")}
    kill_mid_pass(CHILD, job, shards=shards, job_path=tmp_path / "job.json")
    finished = len(list(shards.glob("*.h5")))
    assert 2 <= finished < 5, "the child should die mid-pass"
    resumed = extract(names, paths, tmp_path / "killed", backbone=token_backbone(), shard_size=2)
    assert (resumed.shards_skipped, resumed.shards_done) == (finished, 5 - finished)
    x, y = store.read_features(resumed.path), store.read_features(reference.path)
    assert x.features.shape == (10, 4, 3) and x.features.tobytes() == y.features.tobytes()
    assert list(x.names) == list(y.names) and list(x.errors) == list(y.errors)
    drop = ("created",)
    assert {k: v for k, v in x.attrs.items() if k not in drop} == {
        k: v for k, v in y.attrs.items() if k not in drop
    }
