"""What a feature file declares, checked before anything is read: a 32 KB file may declare terabytes of
rows, and HDF5 hands back fill values for every byte it never stored, so a reader that trusts the header
allocates whatever the header says."""

import os
from pathlib import Path

import h5py
import numpy as np

from cache.settings import ITEM_DIMS
from cxr14.errors import InputError

MAX_ROWS = 10_000_000  # ~90x ChestX-ray14; the largest chest X-ray sets hold a few hundred thousand
# D of a feature vector, T or C of a token map (a 1024-px ViT-S/8 has 16,384 patches), S of an S x S image
MAX_WIDTH = {"features": 65_536, "tokens": 65_536, "pixels": 4_096}
STRING_ROW_BYTES = 120  # memory per row of a names or errors column read as Python strings
DATASETS = ("names", "features", "status", "errors")


def check_declared(path: Path, f: h5py.File, *, attrs: dict, features: bool) -> int:
    """Refuse datasets whose declared types, shapes or sizes cannot be the format's, before reading any of
    them; `features`: the features will be read whole, so they must fit in memory. Returns the row count."""
    for key in DATASETS:
        if key not in f:
            raise InputError(f"{path}: dataset '{key}' is missing; see cache/README.md for the format")
        if not isinstance(f[key], h5py.Dataset):
            raise InputError(f"{path}: '{key}' is an HDF5 group, not a dataset; see cache/README.md")
    _check_columns(path, f)
    _check_features(path, f["features"], attrs=attrs)  # its shape first: a scalar has no rows
    rows = f["names"].shape[0]
    for key in ("features", "status", "errors"):
        if f[key].shape[0] != rows:
            raise InputError(f"{path}: '{key}' declares {f[key].shape[0]} rows but 'names' has {rows}")
    if rows > MAX_ROWS:
        raise InputError(
            f"{path}: declares {rows:,} rows, more than the {MAX_ROWS:,} a feature file may hold"
        )
    _check_stored(path, f["features"])
    if features:
        _check_memory(path, f["features"], rows=rows)
    return rows


def _check_columns(path: Path, f: h5py.File) -> None:
    """names and errors: 1-D strings; status: 1-D integers."""
    for key in ("names", "errors", "status"):
        dataset = f[key]
        wanted = "integer" if key == "status" else "string"
        if key == "status":
            right_type = dataset.dtype.kind in "iu"
        else:
            right_type = h5py.check_string_dtype(dataset.dtype) is not None
        if dataset.ndim != 1 or not right_type:
            raise InputError(
                f"{path}: '{key}' holds {dataset.dtype} of shape {dataset.shape}; expected a 1-D {wanted} "
                "dataset (cache/README.md)"
            )


def _check_features(path: Path, dataset: h5py.Dataset, *, attrs: dict) -> None:
    """The features' declared dtype and shape are those the attributes promise, and of a sane width."""
    kind, views = attrs["kind"], attrs["views"]
    if str(dataset.dtype) != attrs["dtype"]:
        raise InputError(f"{path}: features are {dataset.dtype} but attribute dtype is {attrs['dtype']!r}")
    item_dims = ITEM_DIMS[kind]
    expected = 1 + item_dims + (views > 1)
    shape = dataset.shape
    if len(shape) != expected or (views > 1 and shape[1] != views):
        raise InputError(
            f"{path}: features have shape {shape}; kind {kind!r} with views={views} needs {expected} "
            "dimensions" + (f" with {views} views on axis 1" if views > 1 else "")
        )
    if max(shape[-item_dims:]) > MAX_WIDTH[kind]:
        raise InputError(
            f"{path}: features declare shape {shape}, wider than the {MAX_WIDTH[kind]:,} values a {kind} "
            "item may have; the file is damaged or not a feature file"
        )


def _check_stored(path: Path, dataset: h5py.Dataset) -> None:
    """An uncompressed dataset stores every byte it declares; fewer means rows that were never written."""
    declared = dataset.size * dataset.dtype.itemsize
    filtered = dataset.id.get_create_plist().get_nfilters() > 0  # compressed: stores fewer bytes by design
    if not filtered and dataset.id.get_storage_size() < declared:
        raise InputError(
            f"{path}: features declare {declared:,} bytes but the file stores "
            f"{dataset.id.get_storage_size():,}; it was never written whole: extract it again"
        )


def _check_memory(path: Path, dataset: h5py.Dataset, *, rows: int) -> None:
    """Reading the file whole must fit in the memory available now."""
    needed = dataset.size * dataset.dtype.itemsize + 2 * rows * STRING_ROW_BYTES
    available = available_memory()
    if needed > available:
        raise InputError(
            f"{path}: reading it needs {needed / 2**30:.1f} GiB ({dataset.shape} {dataset.dtype}) but "
            f"{available / 2**30:.1f} GiB of memory is available; free memory or use a machine with more"
        )


def available_memory() -> int:
    """Bytes of memory available to a new allocation: MemAvailable on Linux, else the physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return np.iinfo(np.int64).max  # nothing to measure against: the other limits still hold
