"""Helpers the test modules share (no test module imports another): a tiny project config, a small index
and its caches, fake backbones for the extraction loop, run folders as training writes them, test images
and DICOM films. Pytest fixtures built on them live in conftest.py."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from cache.status import Status
from cache.store import cache_path, write_features
from cxr14.errors import InputError
from dataset import image_loader
from dataset.index import Index
from dataset.settings import LABELS, SplitConfig
from dataset.splits import Splits
from experiments.config import Config
from extract import extraction
from extract.backbones import load_backbone
from extract.inputs import PngInput
from extract.settings import BackboneConfig, ExtractConfig
from heads.data import load_head_data
from heads.models import build_head
from heads.settings import HeadConfig, TrainConfig
from heads.train import train_head
from results.record import read_results

ROOT = Path(__file__).resolve().parents[1]  # the project: where a child process runs

# A tiny project: the config the CLI-level tests run on.

TINY_CONFIG = """
[data]
dir = "data"
[paths]
cache_dir = "features"
runs_dir = "runs"
[backbones.offline_cnn]
source = "random"
image_size = 32
preprocess = "standardize"
width = 8
grid = 2
[backbones.offline_cnn_wide]
source = "random"
image_size = 40
preprocess = "standardize"
seed = 1
width = 8
grid = 3
[backbones.pixels]
source = "pixels"
image_size = 16
preprocess = "bytes"
[train]
epochs = 4
batch_size = 64
lr = 0.01
patience = 2
bootstrap = 50
steps_per_execution = 4
[heads.fc]
units = [16]
dropout = 0.1
[heads.ensemble]
units = [16]
transition = 16
dropout = 0.1
"""


def write_tiny_config(root: Path, extra: str = "") -> Path:
    path = root / "cxr14.toml"
    path.write_text(TINY_CONFIG + extra, encoding="utf-8")
    return path


# A small index, its split and feature caches (stage two's inputs).


def make_index(n: int = 120, *, seed: int = 0, n_labels: int = len(LABELS)) -> Index:
    """A small index: 3 images per patient, multi-hot labels with every label present."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, n_labels)) < 0.3).astype(np.uint8)
    age = rng.uniform(20, 80, n).astype(np.float32)
    age[::17] = np.nan
    return Index(
        csv_path=None,
        label_names=tuple(LABELS[:n_labels]),
        names=np.array([f"{i // 3:08d}_{i % 3:03d}.png" for i in range(n)], dtype=object),
        labels=labels,
        patients=np.arange(n, dtype=np.int64) // 3,
        follow_up=(np.arange(n) % 3).astype(np.int32),
        age=age,
        sex=np.where(rng.random(n) < 0.5, "M", "F").astype(object),
        view=np.where(rng.random(n) < 0.6, "PA", "AP").astype(object),
        width=np.full(n, 1024, np.int32),
        height=np.full(n, 1024, np.int32),
        ages_invalid=0,
    )


def make_splits(index: Index) -> Splits:
    """Patient-wise 60/20/20 by patient id."""
    bucket = index.patients % 5
    assignment = np.where(bucket < 3, "train", np.where(bucket == 3, "val", "test")).astype(object)
    return Splits(assignment=assignment, source="patient-random")


def signal_features(index: Index, *, dim: int = 16, seed: int = 0, noise: float = 1.0) -> np.ndarray:
    """Features that carry the labels linearly, plus noise: a head can learn them."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((index.labels.shape[1], dim))
    return (index.labels @ weights + noise * rng.standard_normal((len(index), dim))).astype(np.float16)


def small_pngs(folder: Path, n: int) -> tuple[list[str], list[str]]:
    """(names, paths) of `n` random 12 x 12 grayscale PNGs made in `folder`, in sorted rows."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"{i:08d}_000.png" for i in range(n)]
    for name in names:
        (folder / name).write_bytes(
            tf.io.encode_png(rng.integers(0, 256, (12, 12, 1), dtype=np.uint8)).numpy()
        )
    return names, [str(folder / name) for name in names]


def kill_mid_pass(child: str, job: dict, *, shards: Path, job_path: Path) -> None:
    """Run the extraction `child` (code for python -c, given the path of `job` as JSON) and kill it with
    SIGKILL, no chance to clean up, once two shards stand in `shards` (or it ends, or two minutes pass)."""
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    process = subprocess.Popen(
        [sys.executable, "-c", child, str(job_path)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while len(list(shards.glob("*.h5"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def signal_data(cache_dir, index: Index, *, name="plain", dim=24, noise=0.5, metadata=False):
    """One cache of signal_features written under `cache_dir`, loaded back as a head's data over
    make_splits(index)."""
    write_cache(cache_dir, name, names=index.names, features=signal_features(index, dim=dim, noise=noise))
    return load_head_data(
        cache_dir=cache_dir, backbones=[name], index=index, splits=make_splits(index), metadata=metadata
    )


def token_data(cache_dir, index: Index, tokens: np.ndarray, *, order=None, **load):
    """A token cache "map" of `tokens` (rows of `index`, stored in `order` when given) written under
    `cache_dir`, loaded back over make_splits(index) without metadata; `load`: load_head_data's options."""
    order = np.arange(len(index.names)) if order is None else order
    write_cache(cache_dir, "map", names=index.names[order], features=tokens[order], kind="tokens")
    return load_head_data(
        cache_dir=cache_dir, backbones=["map"], index=index, splits=make_splits(index), metadata=False, **load
    )


def refused_results(path: Path, record: dict, *, match: str) -> None:
    """Write `record` as the metrics.json `path`, and check that reading it is refused in one line that
    names the file."""
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match=match) as error:
        read_results(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def write_cache(cache_dir, backbone, *, names, features, status=None, kind="features", views=1, attrs=None):
    status = np.zeros(len(names), np.int8) if status is None else status
    errors = np.where(status == Status.OK, "", "broken").astype(object)
    base = {"backbone": backbone, "kind": kind, "dtype": str(features.dtype), "views": views}
    cache_dir.mkdir(parents=True, exist_ok=True)
    return write_features(
        cache_path(cache_dir, backbone),
        names=names,
        features=features,
        status=status,
        errors=errors,
        attrs={**base, **(attrs or {})},
    )


# Stand-ins for backbones, and one extraction pass over them.

SIZE = 8  # backbone input size: tiny, so every test runs in a second or two


@dataclass(frozen=True)
class FakeBackbone:
    """Stands in for extract.backbones.Backbone: normalised uint8 pixels, 2x2 average-pooled; optionally slow."""

    name: str = "fake"
    kind: str = "features"
    spec: image_loader.ImageSpec = image_loader.ImageSpec(size=SIZE, normalization="unit")
    dim: int = 12
    delay: float = 0.0
    calls: list = field(default_factory=list)
    config: dict = field(default_factory=lambda: {"name": "fake", "source": "test"})
    tokens: int = 0  # kind "tokens": the 2x2 cells as 4 tokens of the channels

    def fn(self, pixels):
        self.calls.append(tuple(pixels.shape))
        time.sleep(self.delay)
        images = image_loader.normalize(pixels, self.spec)
        if self.kind == "pixels":
            return images[..., 0]  # "bytes" normalisation: already 0..255
        side = self.spec.size // 2
        pooled = tf.nn.avg_pool2d(images, ksize=side, strides=side, padding="VALID")
        if self.kind == "tokens":
            return tf.reshape(pooled, (tf.shape(images)[0], self.tokens, self.dim))
        return tf.reshape(pooled, (tf.shape(images)[0], -1))


def extract(names, paths, cache_dir, *, backbone=None, backbones=None, images=None, **options):
    """One backbone: its summary. `backbones=[...]`: one pass over all of them, a summary each."""
    settings = dict(batch_size=2, shard_size=4, progress=False) | options
    max_pixels = settings.pop("max_pixels", None)
    summaries = extraction.extract_features(
        backbones=backbones or [backbone or FakeBackbone()],
        names=names,
        images=images or PngInput(paths, max_pixels=max_pixels),
        cache_dir=cache_dir,
        **settings,
    )
    return summaries if backbones else summaries[0]


def token_backbone(**changes) -> FakeBackbone:
    """A fake backbone whose cache keeps its map: 4 tokens (the 2x2 cells) of 3 channels."""
    config = {"name": "fake_map", "source": "test", "output": "map"}
    return FakeBackbone(
        **({"name": "fake_map", "kind": "tokens", "dim": 3, "tokens": 4, "config": config} | changes)
    )


def second_backbone(**changes) -> FakeBackbone:
    """Another fake backbone with its own size, normalisation and channels, to share a pass with the first."""
    spec = image_loader.ImageSpec(size=6, normalization="standardize", channels=1)
    config = {"name": "second", "source": "test"}
    return FakeBackbone(**({"name": "second", "spec": spec, "dim": 4, "config": config} | changes))


# Run folders as training writes them, and test images.

REAL_CXR = Path(__file__).resolve().parents[2] / "shared" / "real-cxr"

TINY = BackboneConfig(name="tiny", source="random", image_size=32, preprocess="unit", seed=1, width=8, grid=2)
TINY_STD = BackboneConfig(
    name="tiny_std", source="random", image_size=24, preprocess="standardize", seed=2, width=8, grid=2
)
PIXELS = BackboneConfig(name="pix", source="pixels", image_size=16, preprocess="bytes")


def make_config(root: Path, *, batch_size: int = 8) -> Config:
    return Config(
        path=root / "cxr14.toml",
        data_dir=root / "data",
        csv="auto",
        labels=LABELS,
        split=SplitConfig(),
        cache_dir=root / "features",
        runs_dir=root / "runs",
        extract=ExtractConfig(batch_size=batch_size),
    )


def _head(backbones: list[BackboneConfig], *, seed: int) -> keras.Model:
    """A small head with one named input per backbone, shaped like the cached arrays."""
    keras.utils.set_random_seed(seed)
    inputs, branches = {}, []
    for cfg in backbones:
        if cfg.source == "pixels":
            x = inputs[cfg.name] = keras.Input((cfg.image_size, cfg.image_size), name=cfg.name)
            x = keras.layers.Rescaling(1 / 255)(keras.layers.Reshape((cfg.image_size, cfg.image_size, 1))(x))
            x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(x))
        else:
            x = inputs[cfg.name] = keras.Input((load_backbone(cfg).dim,), name=cfg.name)
        branches.append(keras.layers.Dense(16, activation="relu")(x))
    x = keras.layers.Add()(branches) if len(branches) > 1 else branches[0]
    # Large weights spread the outputs, so a wrong rounding or a mixed-up input shows in the numbers.
    out = keras.layers.Dense(
        len(LABELS), activation="sigmoid", kernel_initializer=keras.initializers.RandomNormal(stddev=2.0)
    )(x)
    model_inputs = inputs if len(inputs) > 1 else next(iter(inputs.values()))
    return keras.Model(model_inputs, out)


def _models_head(backbones: list[BackboneConfig], *, seed: int) -> keras.Model:
    """The project's own head (heads.models), which takes a dict even for one backbone."""
    kind = "cnn" if backbones[0].source == "pixels" else "ensemble" if len(backbones) > 1 else "fc"
    shapes = {
        cfg.name: (cfg.image_size, cfg.image_size) if cfg.source == "pixels" else (load_backbone(cfg).dim,)
        for cfg in backbones
    }
    head = HeadConfig(kind=kind, units=(16,), transition=8, filters=(4,))
    return build_head(kind=kind, inputs=shapes, n_labels=len(LABELS), head=head, seed=seed)


def make_run(
    run_dir: Path,
    backbones: list[BackboneConfig],
    *,
    dtype: str = "float16",
    metadata: bool = False,
    seed: int = 0,
    project_head: bool = False,
) -> Path:
    """A run folder as heads.train writes it: config.json (provenance.snapshot's keys) and model.keras."""
    run_dir.mkdir(parents=True)
    model = _models_head(backbones, seed=seed) if project_head else _head(backbones, seed=seed)
    model.save(run_dir / "model.keras")
    snapshot = {
        "head": {"kind": "ensemble" if len(backbones) > 1 else "fc", "units": [16], "dropout": 0.0},
        "train": {"metadata": metadata, "seed": seed, "bootstrap": 10},
        "backbones": {cfg.name: cfg.as_dict() for cfg in backbones},
        "labels": list(LABELS),
        "feature_dtypes": {cfg.name: "uint8" if cfg.source == "pixels" else dtype for cfg in backbones},
        "config": {},
    }
    (run_dir / "config.json").write_text(json.dumps(snapshot), encoding="utf-8")
    return run_dir


def add_decisions(run_dir: Path, *, method: str = "platt", seed: int = 0) -> dict:
    """calibration.json and thresholds.json as training writes them, with values drawn for the test."""
    from heads.run_folder import write_decisions

    rng = np.random.default_rng(seed)
    if method == "isotonic":
        params = {
            name: {"x": sorted(rng.random(6).tolist()), "y": sorted(rng.random(6).tolist())}
            for name in LABELS
        }
    else:
        params = {name: {"a": float(rng.uniform(0.3, 2)), "b": float(rng.normal())} for name in LABELS}
    params[LABELS[-1]] = {"identity": True}
    cuts = {name: {"threshold": float(np.float32(rng.uniform(0.2, 0.8)))} for name in LABELS}
    cuts[LABELS[-2]] = {"threshold": None}
    decisions = {
        "calibration": {"method": method, "fitted_on": "val", "bins": 10, "labels": params},
        "thresholds": {"method": "youden", "target": None, "fitted_on": "val", "labels": cuts},
    }
    write_decisions(run_dir, decisions)
    return decisions


def write_png(path: Path, *, size: int = 40, seed: int = 0, bits: int = 8, channels: int = 1) -> Path:
    """A gray test image with a blob whose place depends on the seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.2, 0.8, 2)
    image = 0.3 + 0.6 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) * 20) + 0.05 * rng.random((size, size))
    top = 65535 if bits == 16 else 255
    pixels = np.clip(image * top, 0, top).astype(np.uint16 if bits == 16 else np.uint8)[..., None]
    if channels == 4:
        pixels = np.concatenate([pixels] * 3 + [np.full_like(pixels, top)], axis=-1)
    path.write_bytes(tf.io.encode_png(pixels).numpy())
    return path


# DICOM films.

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def write_dicom(path, pixels: np.ndarray, **attributes):
    """A CR film of `pixels` ((H, W), (frames, H, W) or (H, W, 3)) with the given DICOM attributes."""
    bits = pixels.dtype.itemsize * 8
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CR_STORAGE, "1.2.3.4", "CR"
    ds.Rows, ds.Columns = (
        pixels.shape[-3:-1] if pixels.ndim == 3 and pixels.shape[-1] == 3 else pixels.shape[-2:]
    )
    ds.SamplesPerPixel = 3 if attributes.get("PhotometricInterpretation") == "RGB" else 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# Training a head in a second or two: few epochs, a small batch, few bootstrap resamples.
FAST = TrainConfig(epochs=6, batch_size=32, lr=1e-2, bootstrap=20, patience=2, steps_per_execution=8)
FC = HeadConfig(kind="fc", units=(16,), dropout=0.1)


def train_quickly(run_dir, data, *, head=FC, train=FAST, force=False):
    snapshot = {"labels": list(LABELS), "head": dataclasses.asdict(head), "train": dataclasses.asdict(train)}
    snapshot |= {
        "backbones": dict.fromkeys(data.features),
        "feature_dtypes": dict.fromkeys(data.features, "float16"),
    }
    return train_head(
        run_dir=run_dir,
        data=data,
        head=head,
        train=train,
        label_names=LABELS,
        config_snapshot=snapshot,
        force=force,
        progress=False,
    )
