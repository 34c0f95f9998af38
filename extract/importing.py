"""`run.py import-features`: embeddings made elsewhere (extract/imported.py reads them) matched to the
index by image id, tokens pooled or flattened, written through the store as a normal feature file with a
fingerprint, a status per row and where it came from.

Memory: the output array (index rows x dim), one shard being gathered, and the id tables.
"""

import hashlib
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache.settings import FEATURE_DTYPES
from cache.status import Status
from cache.store import SCHEMA_VERSION, cache_path, image_list_sha256, write_features
from cxr14.errors import Fix, InputError, check_choice
from extract.imported import Row, Source, read_rows
from extract.settings import TOKEN_POOLING, check_pretrained_on

# "mean": average every axis but the last (32 x 128 tokens -> 128); "flatten": one long vector.
TOKENS = TOKEN_POOLING
SHARD = 1024  # rows gathered, pooled and checked at a time
SHOWN = 5  # ids named in the summary's lists
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HASH_BLOCK = 1 << 23


@dataclass(frozen=True)
class ImportSettings:
    """What the user chose for an import (all recorded in the file and its fingerprint)."""

    name: str
    tokens: str = "mean"
    dtype: str = "float16"
    pretrained_on: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        if not SAFE_NAME.match(self.name):
            raise InputError(f"--name {self.name!r}: use letters, digits, '.', '_' and '-' (a file name)")
        check_choice(self.tokens, TOKENS, what="--tokens")
        check_choice(self.dtype, FEATURE_DTYPES, what="--dtype")
        check_pretrained_on(self.pretrained_on, key="--pretrained-on")


@dataclass(frozen=True)
class ImportSummary:
    path: Path
    layout: str
    rows: int  # index images with a row
    dim: int
    row_shape: tuple[int, ...]  # one row as read (tokens x dim, or dim)
    without_row: int  # index images the source has no row for
    without_row_first: list[str]
    unplaced: int  # source ids that are not index images
    unplaced_first: list[str]
    fingerprint: str
    pretrained_on: tuple[str, ...]


class _Placer:
    """Index positions of source ids (with or without .png), refusing an image given twice."""

    def __init__(self, index_names: Sequence[str]):
        self.position = {name: i for i, name in enumerate(index_names)}
        self.filled = np.zeros(len(index_names), bool)
        self.unplaced: list[str] = []
        self._unplaced = set()

    def place(self, row: Row) -> int:
        """The row's index position, or -1 for an id the index does not have (kept for the report)."""
        at = self.position.get(row.id, self.position.get(f"{row.id}.png", -1))
        if at >= 0 and not self.filled[at]:
            self.filled[at] = True
            return at
        if at >= 0 or row.id in self._unplaced:
            raise InputError(f"{row.where}: image {row.id} appears twice; each image must have one row")
        self._unplaced.add(row.id)
        self.unplaced.append(row.id)
        return -1


def import_features(
    source: Source, *, settings: ImportSettings, index_names: Sequence[str], cache_dir: Path, force: bool
) -> ImportSummary:
    """Read `source`, match its rows to `index_names`, write <cache_dir>/NAME.h5 through the store."""
    path = cache_path(cache_dir, settings.name)
    if path.exists() and not force:
        raise InputError(f"{path} exists; pass --force to replace it").fixed_by(
            Fix("import-features", {"force": True})
        )
    placer = _Placer(index_names)
    features, row_shape = _gather(source, settings=settings, placer=placer, rows=len(index_names))
    names = np.asarray(index_names, dtype=object)
    status = np.where(placer.filled, Status.OK, Status.MISSING).astype(np.int8)
    errors = np.where(placer.filled, "", f"no row in {source.path.name}").astype(object)
    imported = _description(source, settings=settings, row_shape=row_shape, unplaced=placer.unplaced)
    attrs = _attrs(settings, names=names, imported=imported)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    write_features(path, names=names, features=features, status=status, errors=errors, attrs=attrs)
    missing = names[~placer.filled]
    return ImportSummary(
        path=path,
        layout=source.layout,
        rows=int(placer.filled.sum()),
        dim=int(features.shape[1]),
        row_shape=row_shape,
        without_row=len(missing),
        without_row_first=[str(n) for n in missing[:SHOWN]],
        unplaced=len(placer.unplaced),
        unplaced_first=placer.unplaced[:SHOWN],
        fingerprint=attrs["fingerprint"],
        pretrained_on=settings.pretrained_on,
    )


def _gather(
    source: Source, *, settings: ImportSettings, placer: _Placer, rows: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The output array, filled shard by shard, and the shape of one row as read."""
    out, row_shape = None, None
    for shard in _shards(read_rows(source)):
        row_shape = row_shape or _row_shape(shard[0], tokens=settings.tokens)
        vectors = _vectors(shard, row_shape=row_shape, settings=settings)
        if out is None:
            out = np.zeros((rows, vectors.shape[1]), dtype=settings.dtype)
        at = np.array([placer.place(row) for row in shard])
        out[at[at >= 0]] = vectors[at >= 0]
    if out is None or not placer.filled.any():
        first = ", ".join(placer.unplaced[:3])
        raise InputError(
            f"{source.path}: none of its {len(placer.unplaced)} ids is an image of the index"
            + (f" (first: {first})" if first else "")
            + "; ids are Image Index names such as 00000001_000.png (with or without .png)"
        )
    return out, row_shape


def _shards(rows: Iterator[Row]) -> Iterator[list[Row]]:
    while shard := list(itertools.islice(rows, SHARD)):
        yield shard


def _row_shape(row: Row, *, tokens: str) -> tuple[int, ...]:
    shape = tuple(int(n) for n in np.shape(row.value))
    if not shape or 0 in shape:
        raise InputError(f"{row.where}: image {row.id} has an array of shape {shape}; expected a vector")
    if len(shape) > 1 and tokens == "keep":
        raise InputError(
            f"{row.where}: rows are {shape} token arrays and token caches do not exist yet; "
            "pass --tokens mean (average over tokens) or --tokens flatten"
        )
    return shape


def _vectors(shard: list[Row], *, row_shape: tuple[int, ...], settings: ImportSettings) -> np.ndarray:
    """One shard's rows as (n, dim) in the stored dtype; a row of another shape, a non-number, NaN or
    a value float16 cannot hold is refused, naming its file and id."""
    for row in shard:
        value = np.asarray(row.value)
        if value.shape != row_shape or value.dtype.kind not in "fiub":
            raise InputError(
                f"{row.where}: image {row.id} has a {value.dtype} array of shape {value.shape}, earlier "
                f"rows {row_shape}; every row must be numbers of one shape"
            )
    stack = np.stack([np.asarray(row.value, dtype=np.float32) for row in shard])
    if len(row_shape) > 1:
        flat = stack.reshape(len(shard), -1, row_shape[-1])
        stack = flat.mean(axis=1) if settings.tokens == "mean" else stack.reshape(len(shard), -1)
    _refuse_not_finite(shard, stack, what="NaN or infinite values")
    with np.errstate(over="ignore"):
        stored = stack.astype(settings.dtype)
    _refuse_not_finite(shard, stored, what=f"values beyond {settings.dtype}'s range (pass --dtype float32)")
    return stored


def _refuse_not_finite(shard: list[Row], values: np.ndarray, *, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad.size:
        row = shard[bad[0]]
        raise InputError(f"{row.where}: image {row.id} has {what}; nothing written")


def _description(source: Source, *, settings: ImportSettings, row_shape, unplaced: list[str]) -> dict:
    """The file's `imported` attribute: where the features came from and how they were read."""
    options = {"tokens": settings.tokens, "dtype": settings.dtype, "key": source.key}
    options |= {"id_column": source.id_column, "row_shape": list(row_shape)}
    return {
        "layout": source.layout,
        "source": str(source.path),
        "sha256": source_sha256(source),
        "options": options,
        "description": settings.description,
        # A count and the first few: an HDF5 attribute holds 64 KiB, not 100,000 ids.
        "unplaced": {"count": len(unplaced), "first": unplaced[:SHOWN]},
    }


def _attrs(settings: ImportSettings, *, names: np.ndarray, imported: dict) -> dict:
    images = image_list_sha256(list(names))
    recipe = {"schema_version": SCHEMA_VERSION, "image_list_sha256": images, "imported": imported}
    return {
        "backbone": settings.name,
        "kind": "features",
        "dtype": settings.dtype,
        "views": 1,
        "image_list_sha256": images,
        "fingerprint": hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest(),
        "imported": imported,
        "pretrained_on": list(settings.pretrained_on),
    }


def source_sha256(source: Source) -> str:
    """SHA-256 over every source file's name and content hash (a folder's in name order)."""
    digests = {}
    for path in source.files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(HASH_BLOCK):
                digest.update(block)
        digests[path.name] = digest.hexdigest()
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def run_import_features(config, *, source: Source, settings: ImportSettings, force: bool) -> ImportSummary:
    """Import into the config's cache folder, matched to the config's data set index."""
    from dataset.index import find_csv, read_index

    if settings.name in config.backbones:
        raise InputError(
            f"{config.path} has a [backbones.{settings.name}] table, which nothing in an imported file "
            "could be checked against; import under another --name (or remove the table)"
        )
    index = read_index(find_csv(config.data_dir, config.csv), label_names=config.labels)
    return import_features(
        source, settings=settings, index_names=list(index.names), cache_dir=config.cache_dir, force=force
    )


def format_import(summary: ImportSummary) -> str:
    """What the terminal shows after an import."""
    shape = " x ".join(map(str, summary.row_shape))
    lines = [
        f"imported {summary.rows:,} images ({summary.layout}, rows of {shape} -> {summary.dim}) "
        f"into {summary.path}",
    ]
    if summary.without_row:
        lines.append(
            f"{summary.without_row:,} index images have no row (stored as missing; first: "
            f"{', '.join(summary.without_row_first)})"
        )
    if summary.unplaced:
        lines.append(
            f"{summary.unplaced:,} ids are not images of the index and were left out (first: "
            f"{', '.join(summary.unplaced_first)})"
        )
    if summary.pretrained_on:
        lines.append(f"pre-trained on: {', '.join(summary.pretrained_on)}")
    lines.append(f"next: python run.py train-head --backbone {summary.path.stem}")
    return "\n".join(lines)
