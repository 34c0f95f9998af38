"""The rows a head trains on: cached features joined by image name with labels, patients, splits and
metadata, each cache's description (kind, views, dtype, recipe) beside them; whether they can train a head;
and a head's inputs from them."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cache.origin import check_origin
from cache.paths import cache_file
from cache.status import Status
from cache.store import (
    MadeDifferently,
    check_recipe,
    declared_features,
    read_features,
)
from cache.stream import StreamedFeatures, finite_rows_of, stream_features
from cxr14.caveats import saw_chestxray14
from cxr14.errors import Fix, InputError
from cxr14.names import positions
from dataset.splits import SPLITS
from heads.settings import TOKEN_MEMORY_GB

METADATA_INPUT = "metadata"  # the head's input name for the metadata columns
# Metadata columns concatenated to the features (--metadata): age scaled to ~[0, 1], a flag for a
# missing age (filled with the training median), sex and view position one-hot.
METADATA_COLUMNS = ("age", "age_missing", "sex_M", "sex_F", "view_PA", "view_AP")
AGE_SCALE = 100.0


@dataclass(frozen=True, eq=False)
class HeadData:
    """Rows in play, in index order; every array is aligned with `names`."""

    names: np.ndarray  # (N,) object str
    labels: np.ndarray  # (N, L) float32 multi-hot
    patients: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) object, one of SPLITS
    features: dict[str, np.ndarray]  # per backbone: (N, D) | (N, K, D) | (N, T, C) | (N, S, S) | (N, K, S, S)
    metadata: np.ndarray | None  # (N, len(METADATA_COLUMNS)) float32, or None
    excluded: dict[str, int]  # index rows left out, by reason
    split_source: str = ""  # "official" | "patient-random" | "frozen" | "synthetic sample (...)"
    label_names: tuple[str, ...] = ()  # names of the label columns, in order
    caches: dict[str, dict] = field(default_factory=dict)  # per backbone: the store's attributes
    # The metadata columns of every row, whether or not the head takes them: the metadata-only baseline's.
    covariates: np.ndarray | None = None
    synthetic: bool = False  # a make-sample data set: no result on it is comparable with published ones
    # Backbones whose pre-training saw ChestX-ray14 images: every result says so beside published numbers.
    seen_chestxray14: tuple[str, ...] = ()
    # Per backbone whose tokens stage one reduced in channels (map_channels): that projection, which the
    # run keeps so that new images are projected alike (inference/trained.py).
    projections: dict = field(default_factory=dict)

    def views(self, name: str) -> int:
        """Views per image in backbone `name`'s cache (1: one plain view, stored without a views axis)."""
        if name in self.caches:
            return int(self.caches[name]["views"])
        return 1

    def is_tokens(self, name: str) -> bool:
        """Whether backbone `name`'s cache holds token maps (output = "map"), (T, C) per image."""
        return self.caches.get(name, {}).get("kind") == "tokens"

    def item_shape(self, name: str) -> tuple:
        """The per-image shape of one view of backbone `name`: (D,) features, (T, C) tokens or (S, S)
        pixels."""
        array = self.features[name]
        return tuple(array.shape[2:] if self.views(name) > 1 else array.shape[1:])

    def rows(self, split: str) -> np.ndarray:
        """Positions of the rows in `split`."""
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return np.flatnonzero(self.split == split)

    def describe(self) -> str:
        """One line for the terminal: rows kept per split and rows left out, by reason."""
        counts = ", ".join(f"{s} {int((self.split == s).sum())}" for s in SPLITS)
        left_out = ", ".join(f"{k} {v}" for k, v in self.excluded.items() if v) or "none"
        caches = " and ".join(self.features)
        return f"{len(self.names)} images present in {caches} ({counts}); left out: {left_out}"


def check_labels(data: HeadData, label_names) -> None:
    """Refuse label names that are not the data's label columns, in order.

    The config may list a subset of the labels in any order; a run evaluated under another list would
    otherwise score each disease's probabilities against another disease's column.
    """
    label_names = list(label_names)
    columns = list(data.label_names) or [f"{data.labels.shape[1]} columns"]
    if data.labels.shape[1] != len(label_names) or (data.label_names and columns != label_names):
        raise InputError(
            f"the run's labels {label_names} are not the index's label columns {columns}; "
            "set [data] labels to the run's own (its config.json) and load the index again"
        )


def training_rows(data: HeadData, *, label_names: list[str], augment: bool) -> dict[str, np.ndarray]:
    """The rows of each split, once the data is seen to be trainable: the run's labels, training and
    validation rows, a label with both classes in val for early stopping, cached views to augment from."""
    rows = {split: data.rows(split) for split in ("train", "val", "test")}
    check_labels(data, label_names)
    for split in ("train", "val"):
        if rows[split].size == 0:
            raise InputError(
                f"the {split} split has no images with features; check the split policy and the caches"
            )
    val = data.labels[rows["val"]]
    if not ((val.sum(axis=0) > 0) & (val.sum(axis=0) < len(val))).any():
        raise InputError(
            f"no label has both classes in the val split ({len(val)} images), so early stopping has no "
            "AUC to watch; use more images or a larger val_fraction"
        )
    if augment and not any(data.views(name) > 1 for name in data.features):
        raise InputError(
            "augmenting trains on cached augmented views, but the caches hold one view per image; "
            "extract with [extract] views > 1 (e.g. views = 4), or train without augmentation"
        )
    return rows


def load_head_data(
    *,
    cache_dir: Path,
    backbones: Sequence[str],
    index,
    splits,
    metadata: bool,
    synthetic: bool = False,
    pretrained_on: Mapping[str, Sequence[str]] | None = None,
    token_memory_gb: float = TOKEN_MEMORY_GB,
) -> HeadData:
    """Read each backbone's cache once, align its rows to the index by name, keep rows OK in every cache.
    `metadata`: the head takes the metadata columns; `synthetic`: the data set is a make-sample one;
    `pretrained_on`: per backbone, what its weights saw (the config's tables; a cache without one says
    it itself, as imported features do); `token_memory_gb`: a token cache larger than this stays on disk
    and is read a block at a time ([train] token_memory_gb)."""
    if not backbones:
        raise InputError("no backbone given; pass --backbone NAME (one of the [backbones.*] in the config)")
    in_split = np.isin(splits.assignment, SPLITS)
    absent, failed, not_finite = (np.zeros(len(index.names), bool) for _ in range(3))
    unknown = 0
    cached, attrs, projections = {}, {}, {}
    for name in backbones:
        cache = _read_cache(Path(cache_dir), name, index, token_memory_gb=token_memory_gb)
        absent |= cache.position < 0
        failed |= (cache.position >= 0) & (cache.status != Status.OK)
        not_finite |= cache.not_finite
        unknown = max(unknown, cache.not_in_index)
        cached[name], attrs[name] = (cache.features, cache.position), cache.attrs
        projections[name] = cache.projection
    excluded = _left_out(
        in_split=in_split, absent=absent, failed=failed, not_finite=not_finite, unknown=unknown
    )
    keep = in_split & ~absent & ~failed & ~not_finite
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise InputError(
            f"no image has features in every cache of {list(backbones)} under {cache_dir}; "
            f"left out: {excluded}. Re-extract the caches from scratch"
        )
    # Gather one cache at a time, dropping each stored array as soon as its rows are taken.
    features = {name: _take(*cached.pop(name), rows) for name in backbones}
    covariates = _metadata(index, splits, rows)
    return HeadData(
        names=index.names[rows],
        labels=index.labels[rows].astype(np.float32),
        patients=np.asarray(index.patients)[rows],
        split=np.asarray(splits.assignment, dtype=object)[rows],
        features=features,
        metadata=covariates if metadata else None,
        excluded=excluded,
        split_source=splits.source,
        label_names=tuple(index.label_names),
        caches=attrs,
        covariates=covariates,
        synthetic=synthetic,
        seen_chestxray14=tuple(saw_chestxray14(_pretraining(attrs, pretrained_on or {}))),
        projections={name: p for name, p in projections.items() if p is not None},
    )


def _left_out(*, in_split, absent, failed, not_finite, unknown: int) -> dict[str, int]:
    """Rows left out, by reason; each counted once: absent from some cache first, else failed, else not
    finite."""
    return {
        "failed_extraction": int((in_split & failed & ~absent).sum()),
        "not_finite": int((in_split & not_finite & ~failed & ~absent).sum()),
        "not_in_cache": int((in_split & absent).sum()),
        "not_in_index": unknown,
        "no_split": int((~in_split).sum()),
    }


def _pretraining(attrs: dict[str, dict], configured: Mapping[str, Sequence[str]]) -> dict[str, Sequence]:
    """Per backbone, its pre-training data sets: from the config's table, else from its cache."""
    return {name: configured.get(name, a.get("pretrained_on") or ()) for name, a in attrs.items()}


class _Cache(NamedTuple):
    """One cache read and aligned to the index: per index row its stored row (-1: absent), its status
    (meaningful where present) and whether its features hold NaN or inf."""

    features: np.ndarray  # as stored
    position: np.ndarray
    status: np.ndarray
    not_finite: np.ndarray
    not_in_index: int  # stored names the index does not know
    attrs: dict
    projection: object = None  # cache.projection.Projection of a token cache reduced in channels


def _read_cache(cache_dir: Path, backbone: str, index, *, token_memory_gb: float) -> _Cache:
    """A cache's features as stored, aligned to the index by name; refused if changed since it was made
    (rows, names or attributes) or made from another data set; a cache beyond the budget stays on disk."""
    path = cache_file(cache_dir, backbone)
    try:
        # A cache beyond the budget stays on disk and is read a block at a time (cache/stream.py).
        streamed = beyond_budget(path, budget_gb=token_memory_gb)
        cached = (
            stream_features(path, budget_bytes=int(token_memory_gb * 1e9))
            if streamed
            else read_features(path)
        )
        check_recipe(path, attrs=cached.attrs, names=cached.names)
        # Same names are not the same images: the cache must come from this index's data set.
        check_origin(path, recorded=cached.attrs.get("dataset"), names=cached.names, index=index)
        # Join by name, never by position: a cache may hold its rows in any order, or other images.
        position = positions(index.names, among=cached.names)
        if not (position >= 0).any():
            raise MadeDifferently(
                f"{path}: none of its {len(cached.names)} image names are in {index.csv_path}; the cache "
                "was made from another image list; re-extract it from scratch"
            )
    except MadeDifferently as err:
        raise InputError(str(err)).fixed_by(Fix("extract", {"backbone": backbone, "force": True})) from None
    found = position >= 0
    status = np.full(len(position), Status.MISSING, dtype=np.int8)
    status[found] = cached.status[position[found]]
    # NaN or inf would turn every score into a constant: such rows are left out and counted.
    not_finite = np.zeros(len(position), dtype=bool)
    not_finite[found] = (status[found] == Status.OK) & ~finite_rows_of(cached.features)[position[found]]
    not_in_index = len(cached.names) - int(found.sum())
    return _Cache(
        cached.features, position, status, not_finite, not_in_index, cached.attrs, cached.projection
    )


def beyond_budget(path: Path, *, budget_gb: float) -> bool:
    """Whether a cache's features exceed the memory budget, so that they are streamed, not loaded whole.
    Only token maps come near it (a pooled full-size cache is 0.46 GB); its declared shape is read, not
    its attributes, which the load reads once."""
    shape, dtype = declared_features(path)
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize > budget_gb * 1e9


def _take(stored: np.ndarray, position: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The stored rows of index rows `rows`, without a copy when that is all of `stored` in its order."""
    positions = position[rows]
    if isinstance(stored, StreamedFeatures):
        return stored.take(positions)  # still on disk
    if len(positions) == len(stored) and np.array_equal(positions, np.arange(len(stored))):
        return stored
    return stored[positions]


def _metadata(index, splits, rows: np.ndarray) -> np.ndarray:
    """Age, sex and view position as float32 columns (METADATA_COLUMNS) for `rows`."""
    age = np.asarray(index.age, dtype=np.float32)
    train_ages = age[(np.asarray(splits.assignment) == "train") & ~np.isnan(age)]
    fill = float(np.median(train_ages)) if train_ages.size else 50.0
    return encode_metadata(
        age=age[rows], sex=np.asarray(index.sex)[rows], view=np.asarray(index.view)[rows], fill_age=fill
    )


def encode_metadata(*, age: np.ndarray, sex: np.ndarray, view: np.ndarray, fill_age: float) -> np.ndarray:
    """(N, 6) float32 in METADATA_COLUMNS order; a NaN age becomes fill_age with its missing flag set."""
    age = np.asarray(age, dtype=np.float32)
    missing = np.isnan(age)
    columns = [
        np.where(missing, fill_age, age) / AGE_SCALE,
        missing,
        sex == "M",
        sex == "F",
        view == "PA",
        view == "AP",
    ]
    return np.stack(columns, axis=1).astype(np.float32)


def head_inputs(model, data: HeadData, rows: np.ndarray, *, all_views: bool = False, only: str = "") -> dict:
    """{input name: array} for `rows` of a built head (or of its input `only`); cached views beyond the
    plain one (view 0) only with all_views."""
    arrays = {}
    for tensor in model.inputs:
        name = tensor.name
        if only and name != only:
            continue
        if name == METADATA_INPUT:
            if data.metadata is None:
                raise InputError("this head was trained with metadata; load the data with metadata=True")
            arrays[name] = data.metadata[rows]
        elif name not in data.features:
            raise InputError(
                f"the head takes backbone {name!r} but the loaded features are {list(data.features)}; "
                "pass the run's backbones (see its config.json)"
            )
        else:
            arrays[name] = _rows_of(data, name, rows, item_shape=tuple(tensor.shape[1:]), all_views=all_views)
    return arrays


def training_arrays(model, *, data: HeadData, rows: np.ndarray, augment: bool, leave_out=()) -> dict:
    """{input name: tensor} of `model`'s inputs on the training rows (every cached view when augmenting),
    but those named in `leave_out` (caches streamed from disk)."""
    import tensorflow as tf  # only a head about to train needs tensors; the data loads without TensorFlow

    # One input at a time: each training copy becomes a tensor and is dropped before the next is made
    # (all at once, the copies and the tensors of an ensemble coexisted: ~0.5 GB more at full size).
    arrays = {}
    for tensor in model.inputs:
        if tensor.name in leave_out:
            continue
        (array,) = head_inputs(model, data, rows, all_views=augment, only=tensor.name).values()
        arrays[tensor.name] = tf.convert_to_tensor(array)
        del array
    return arrays


def _rows_of(data: HeadData, name: str, rows: np.ndarray, *, item_shape: tuple, all_views: bool):
    """The requested rows of one cache, view 0 of a multi-view cache unless all views are wanted."""
    features, has_views = data.features[name], data.views(name) > 1
    if data.item_shape(name) != item_shape:
        raise InputError(
            f"cached features of {name!r} have per-image shape {data.item_shape(name)} but the "
            f"head was built for {item_shape}; the cache was re-extracted differently: retrain the head"
        )
    if has_views and not all_views:
        return features[rows, 0]
    if len(rows) == len(features) and np.array_equal(rows, np.arange(len(features))):
        return features  # every row, in order: no copy of a large array
    return features.take(rows) if isinstance(features, StreamedFeatures) else features[rows]
