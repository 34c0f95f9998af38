"""A token map reduced in channels ([backbones.NAME] map_channels): a PCA fitted on training images only,
stored in the feature file and checked on read, applied to every image, and kept across a SIGKILL."""

import dataclasses

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from cache import store
from cache.projection import Projection
from cxr14.errors import InputError
from dataset.image_loader import load_image, read_gray01
from dataset.sample import make_sample
from experiments.config import load_config
from experiments.data import open_config_dataset
from experiments.experiment import run_train_head
from experiments.extract import run_extract
from experiments.provenance import check_cache
from extract.backbones import load_backbone
from extract.settings import PROJECTION_KEYS, BackboneConfig
from heads.run_folder import projection_path
from inference.export import export_run
from inference.heatmap import explain
from inference.predict import predict_images
from inference.trained import load_run
from tests.fixtures import extract, kill_mid_pass, make_index, make_splits, write_png, write_tiny_config

# The random net's 2 x 2 cells: 4 tokens of 8 channels, kept as 3.
MAP = dict(
    name="net", source="random", image_size=32, preprocess="unit", seed=1, width=8, grid=2, output="map"
)
PROJECTED = BackboneConfig(**MAP, map_channels=3, map_fit_images=8, map_fit_seed=5)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """(index, paths, projected file, unprojected float32 file) of the net over 45 PNGs."""
    root = tmp_path_factory.mktemp("projection")
    index = make_index(45)
    (root / "images").mkdir()
    paths = [str(write_png(root / "images" / name, size=40, seed=i)) for i, name in enumerate(index.names)]
    train = make_splits(index).mask("train")
    options = dict(batch_size=8, shard_size=16, train=train)
    projected = extract(index.names, paths, root / "projected", backbone=load_backbone(PROJECTED), **options)
    plain = extract(
        index.names, paths, root / "plain", backbone=load_backbone(BackboneConfig(**MAP)), dtype="float32",
        **options,
    )  # fmt: skip
    return index, paths, projected.path, plain.path


def test_map_channels_needs_a_map_and_fewer_channels_than_it_has(tmp_path):
    with pytest.raises(InputError, match=r"backbones.net.map_channels = 4 .*output = \"map\""):
        BackboneConfig(**(MAP | {"output": "pooled"}), map_channels=4)
    assert "map_channels" not in BackboneConfig(**MAP).as_dict()  # map caches made before it stay valid
    assert PROJECTED.as_dict()["map_channels"] == 3 and PROJECTED.as_dict()["map_fit_seed"] == 5
    names = [f"{i:08d}_000.png" for i in range(4)]
    wide = load_backbone(dataclasses.replace(PROJECTED, map_channels=8))
    with pytest.raises(InputError, match=r"backbones.net.map_channels = 8 must be fewer than .* 8 channels"):
        extract(names, [""] * 4, tmp_path / "cache", backbone=wide, train=np.ones(4, bool))
    with pytest.raises(InputError, match=r"map_channels.*given no split"):
        extract(names, [""] * 4, tmp_path / "cache", backbone=load_backbone(PROJECTED))
    with pytest.raises(InputError, match=r"map_channels.*none of the images.*training split"):
        extract(
            names, [""] * 4, tmp_path / "cache", backbone=load_backbone(PROJECTED), train=np.zeros(4, bool)
        )


def test_the_projection_is_fitted_on_a_sample_of_training_images_only(extracted):
    index, _, projected, _ = extracted
    got = store.read_features(projected)
    splits = make_splits(index)
    fit = set(got.projection.fit_names)
    assert len(fit) == PROJECTED.map_fit_images  # a sample: 27 training images, 8 drawn
    assert fit <= set(index.names[splits.mask("train")])
    assert not fit & set(index.names[splits.mask("val") | splits.mask("test")])
    assert got.attrs["projection"]["fit_images"] == 8 and got.attrs["projection"]["fit_split"] == "train"
    assert got.attrs["backbone_config"]["resolved"]["map_fit"]["images"] == 8


def test_stored_tokens_are_the_maps_projected_onto_orthonormal_components(extracted):
    _, _, projected, plain = extracted
    got, full = store.read_features(projected), store.read_features(plain)
    assert (
        got.features.shape == (45, 4, 3) and got.features.dtype == np.float16 and full.features.shape[-1] == 8
    )
    p = got.projection
    np.testing.assert_allclose(p.components @ p.components.T, np.eye(3), atol=1e-5)
    assert np.all(np.diff(p.explained) <= 0) and 0 < p.explained.sum() <= 1 + 1e-6
    expected = (full.features - p.mean) @ p.components.T
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got.features.astype(np.float32), expected, rtol=2e-3, atol=2e-3 * scale)


def test_every_view_is_projected_alike(extracted, tmp_path):
    index, paths, _, _ = extracted
    train = make_splits(index).mask("train")[:12]
    options = dict(batch_size=8, shard_size=16, train=train, views=2)
    got = store.read_features(
        extract(index.names[:12], paths[:12], tmp_path, backbone=load_backbone(PROJECTED), **options).path
    )
    assert got.features.shape == (12, 2, 4, 3)  # views on axis 1, each of K channels
    assert set(got.projection.fit_names) <= set(index.names[:12][train])
    # One projection for every view: view 0 is the plain image, as a one-view extraction stores it.
    single = extract(index.names[:12], paths[:12], tmp_path / "one", backbone=load_backbone(PROJECTED),
                     **(options | {"views": 1}))  # fmt: skip
    np.testing.assert_array_equal(got.features[:, 0], store.read_features(single.path).features)


def test_the_store_round_trips_a_projection_and_refuses_a_bad_one(extracted, tmp_path):
    _, _, projected, _ = extracted
    got = store.read_features(projected)
    attrs = {"backbone": "net", "kind": "tokens", "dtype": "float16", "views": 1}
    columns = dict(names=got.names, features=got.features, status=got.status, errors=got.errors)
    again = store.read_features(
        store.write_features(tmp_path / "net.h5", **columns, attrs=attrs, projection=got.projection)
    )
    assert again.projection.digest() == got.projection.digest() and again.attrs["projection"]["channels"] == 3
    assert (
        store.read_projection(tmp_path / "net.h5").digest() == got.projection.digest()
    )  # features left on disk
    p = got.projection
    wrong = dataclasses.replace(p, components=p.components[:2], explained=p.explained[:2])
    with pytest.raises(InputError, match=r"u.h5.*features have 3 channels but the projection makes 2"):
        store.write_features(tmp_path / "u.h5", **columns, attrs=attrs, projection=wrong)
    edited = tmp_path / "net.h5"
    with h5py.File(edited, "r+") as f:  # a hand edit: components of another width
        del f["projection_components"]
        f["projection_components"] = np.zeros((3, 5), np.float32)
    for read in (store.read_features, store.read_projection, store.check_rows):
        with pytest.raises(InputError, match=rf"{edited}: projection shapes .* do not fit together"):
            read(edited)
    with h5py.File(edited, "r+") as f:
        del f.attrs["projection"]
    with pytest.raises(InputError, match=rf"{edited}: holds dataset\(s\).*but no projection attribute"):
        store.read_features(edited)


SAMPLE_TABLES = """
[backbones.proj]
source = "random"
image_size = 32
preprocess = "standardize"
width = 8
grid = 2
output = "map"
map_channels = 3
map_fit_images = 10
[heads.attention]
transition = 8
units = [8]
dropout = 0.0
"""


def test_from_the_config_the_fit_uses_the_train_split_and_an_attention_head_trains_on_it(tmp_path):
    config = load_config(write_tiny_config(tmp_path, SAMPLE_TABLES))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=2))
    make_sample(config.data_dir, images=60, size=32, seed=0, label_names=config.labels, progress=False)
    (summary,) = run_extract(config, backbones=["proj"])
    got = store.read_features(summary.path)
    dataset = open_config_dataset(config)
    train = set(dataset.index.names[dataset.splits.mask("train")])
    assert got.features.shape[1:] == (4, 3) and len(got.projection.fit_names) == 10
    assert set(got.projection.fit_names) <= train  # the data set's own patient-wise split
    metrics = run_train_head(config, kind="attention", backbones="proj", name="attention", force=False)
    model = keras.saving.load_model(metrics["run_dir"] / "model.keras")
    assert tuple(model.inputs[0].shape[1:]) == (4, 3)  # it takes the stored K channels
    assert metrics["val_mean_auc"] >= metrics["reference"]["val_mean_auc"] - 1e-9  # it starts at the probe
    # The run keeps the projection: new films' tokens are projected as the cache's were, so predict,
    # export (checked against predict to 1e-5 by export_run itself) and heatmaps work on it.
    run = load_run(metrics["run_dir"])
    assert run.backbones["proj"].dim == 3
    film = config.data_dir / "images" / got.names[0]
    pixels = load_image(film, run.backbones["proj"].spec)[None]
    tokens = np.asarray(run.backbones["proj"].fn(tf.convert_to_tensor(pixels)))
    np.testing.assert_allclose(tokens[0], got.features[0].astype(np.float32), atol=2e-3, rtol=2e-3)
    (predicted,) = predict_images(run_dir=metrics["run_dir"], inputs=[film], extract=config.extract)
    assert not predicted.get("error")
    # Through the projection, a film scores as the head scores its cached (projected) tokens.
    cached = model.predict({"proj": got.features[:1].astype(np.float32)}, verbose=0)[0]
    scored = [predicted["uncalibrated"][label] for label in run.labels]
    np.testing.assert_allclose(scored, cached, atol=2e-3)
    assert (export_run(run_dir=metrics["run_dir"], out_dir=tmp_path / "export") / "saved_model.pb").exists()
    explanation = explain(run, read_gray01(film), labels=list(config.labels[:1]), method="attention")
    assert explanation.maps.shape[0] == 1
    with pytest.raises(InputError, match=r"config.json: backbone name = '\.\./x' must be a plain name"):
        projection_path(metrics["run_dir"], "../x")  # a hand-edited config.json cannot lead out of the run
    metrics["run_dir"].joinpath("projection-proj.npz").unlink()  # a run that lost it says so
    with pytest.raises(InputError, match=r"tokens reduced in channels.*holds no projection-proj.npz"):
        load_run(metrics["run_dir"])
    # A cache of the same map kept whole is not the projected one the config asks for.
    whole = {k: v for k, v in got.attrs["backbone_config"].items() if k not in PROJECTION_KEYS}
    with pytest.raises(InputError, match=r"\(map_channels None in the cache, 3 in the config;"):
        attrs = {"backbone_config": whole, "backbone": "proj"}
        check_cache(summary.path, name="proj", attrs=attrs, configured=config.backbone("proj"))


CHILD = """
import dataclasses, json, sys, time
import numpy as np
from extract.backbones import load_backbone
from extract.settings import BackboneConfig
from tests.fixtures import extract
job = json.load(open(sys.argv[1]))
backbone = load_backbone(BackboneConfig(**job["config"]))
def slow(pixels, fn=backbone.fn):
    time.sleep(0.3)
    return fn(pixels)
extract(job["names"], job["paths"], job["cache"], backbone=dataclasses.replace(backbone, fn=slow),
        shard_size=2, train=np.array(job["train"]))
"""


def test_a_killed_projected_extraction_resumes_to_identical_files(extracted, tmp_path):
    index, paths, _, _ = extracted
    names, paths, train = list(index.names[:10]), paths[:10], make_splits(index).mask("train")[:10]
    backbone = load_backbone(PROJECTED)
    options = dict(shard_size=2, train=train)
    reference = extract(names, paths, tmp_path / "reference", backbone=backbone, **options)
    shards = store.shard_dir(tmp_path / "killed", "net")
    config = dataclasses.asdict(PROJECTED) | {"pretrained_on": []}
    job = {"names": names, "paths": paths, "cache": str(tmp_path / "killed"), "config": config}
    kill_mid_pass(CHILD, job | {"train": train.tolist()}, shards=shards, job_path=tmp_path / "job.json")
    finished = len(list(shards.glob("*.h5")))
    assert 2 <= finished < 5, "the child should die mid-pass"
    saved = (shards / store.FITTED).read_bytes()  # saved before its first shard
    resumed = extract(names, paths, tmp_path / "killed", backbone=backbone, **options)
    assert (resumed.shards_skipped, resumed.shards_done) == (finished, 5 - finished)
    assert (shards / store.FITTED).read_bytes() == saved  # reused, not fitted again
    x, y = store.read_features(resumed.path), store.read_features(reference.path)
    assert x.features.shape == (10, 4, 3) and x.features.tobytes() == y.features.tobytes()
    assert x.projection.digest() == y.projection.digest() and list(x.names) == list(y.names)
    drop = ("created",)
    assert {k: v for k, v in x.attrs.items() if k not in drop} == {
        k: v for k, v in y.attrs.items() if k not in drop
    }


def test_a_shard_projected_differently_is_not_merged(tmp_path):
    tokens = np.ones((2, 4, 3), np.float16)
    attrs = {"backbone": "n", "kind": "tokens", "dtype": "float16", "views": 1, "shard_size": 2}
    attrs |= {"fingerprint": "f"}

    def projection(seed):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(8, 3)))
        return Projection(
            mean=rng.normal(size=8).astype(np.float32), components=q.T.astype(np.float32),
            explained=np.array([0.5, 0.3, 0.1], np.float32), fit_names=np.array(["a"], object), fit_seed=seed,
        )  # fmt: skip

    for start, seed in ((0, 0), (2, 1)):
        store.write_shard(
            tmp_path, start=start, stop=start + 2, total_rows=4, names=[f"r{start}", f"r{start + 1}"],
            features=tokens, status=[0, 0], errors=["", ""], attrs=attrs, projection=projection(seed),
        )  # fmt: skip
    with pytest.raises(InputError, match="projected differently from the first shard"):
        store.merge_shards(tmp_path, out_path=tmp_path / "n.h5")


def test_a_projection_fitted_for_another_recipe_is_refused_and_force_starts_over(extracted, tmp_path):
    index, paths, projected, _ = extracted
    names, paths, train = index.names[:6], paths[:6], make_splits(index).mask("train")[:6]
    shards = store.shard_dir(tmp_path, "net")
    store.save_fitted(shards, store.read_features(projected).projection, fingerprint="another recipe")
    backbone = load_backbone(PROJECTED)
    with pytest.raises(InputError, match=r"projection.npz was fitted for another recipe"):
        extract(names, paths, tmp_path, backbone=backbone, train=train)
    summary = extract(names, paths, tmp_path, backbone=backbone, train=train, force=True)
    assert set(store.read_features(summary.path).projection.fit_names) <= set(names[train])
