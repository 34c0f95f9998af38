"""The feature store: the one module that reads and writes HDF5 feature files (format: cache/README.md)."""

import errno
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

from cache import checksums as crc
from cache import projection as proj
from cache.limits import check_declared
from cache.paths import cache_path, refuse_folder, shard_dir  # noqa: F401  (the store's paths, read from here too)
from cache.settings import DTYPES, ITEM_DIMS
from cache.status import Status
from cxr14.errors import InputError
from cxr14.names import positions
from cxr14.temps import remove_stale_temps, temp_path

# Version 2 added the rows' `checksums` and the data set's fingerprint (`dataset`); version 1 files are
# refused, since nothing in them can show their rows are still the rows that were written. A token map's
# channel projection (the `projection` attribute and its datasets) came later within version 2: it is
# optional, and a file without one reads as before, so it needed no new version that would refuse every
# cache made until then; this code checks it wherever a file has one.
SCHEMA_VERSION = 2
REQUIRED_ATTRS = ("schema_version", "backbone", "kind", "dtype", "views")
JSON_ATTRS = (
    "backbone_config",
    "preprocess",
    "versions",
    "imported",
    "pretrained_on",
    "dataset",
    "checksums",
    "projection",
)
# What the fingerprint hashes, by attribute name (image_list_sha256 stands for the names).
RECIPE_ATTRS = (
    "schema_version",
    "image_list_sha256",
    "dataset",
    "backbone_config",
    "preprocess",
    "dtype",
    "views",
    "shard_size",
)
OPTIONAL_RECIPE = ("dataset",)  # absent when extraction was given no index; hashed as null then
# The type of every attribute the format names: a hand-edited file is refused by key, not by a traceback.
ATTR_TYPES = {
    **dict.fromkeys(("backbone", "kind", "dtype", "fingerprint", "image_list_sha256", "created"), str),
    **dict.fromkeys(
        ("views", "image_size", "shard_size", "shard_start", "shard_stop", "shard_total_rows"), int
    ),
    **dict.fromkeys(JSON_ATTRS, dict),
    "pretrained_on": list,  # a JSON list of data set names
}
DATASETS = ("names", "features", "status", "errors")
SHARD_ATTRS = ("shard_start", "shard_stop", "shard_total_rows")
LIBRARIES = ("numpy", "h5py", "tensorflow", "keras", "tensorflow-hub")
FINITE_CHUNK = 4096  # rows checked for NaN/inf at a time, so the check needs no full-size copy
FITTED = "projection.npz"  # a shard directory's fitted projection, saved before its first shard


class MadeDifferently(InputError):
    """A feature file or shard that this extraction cannot reuse (another recipe, or not a shard at all):
    extracting again from scratch fixes it."""


@dataclass(frozen=True)
class FeatureSet:
    """A feature file in memory: rows aligned across names, features, status and errors."""

    path: Path
    names: np.ndarray  # (N,) object str
    features: np.ndarray  # (N, D) | (N, K, D) | (N, T, C) float | (N, S, S) | (N, K, S, S) uint8 for pixels
    status: np.ndarray  # (N,) int8 Status
    errors: np.ndarray  # (N,) object str, "" when OK
    attrs: dict
    projection: proj.Projection | None = None  # tokens reduced in channels (cache/projection.py)


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """Fixed (start, stop) slices of the sorted index; the last one may be short."""
    if shard_size < 1:
        raise InputError(f"shard_size must be at least 1, got {shard_size}")
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def image_list_sha256(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def fingerprint(
    *,
    names: Sequence[str],
    backbone_config: dict,
    preprocess: dict,
    dtype: str,
    views: int,
    shard_size: int,
    dataset: dict | None = None,
) -> str:
    """Hash of everything that decides a file's bytes, and the data set its rows belong to (`dataset`,
    cache.origin); library versions are recorded, not hashed."""
    recipe = {
        "schema_version": SCHEMA_VERSION,
        "image_list_sha256": image_list_sha256(names),
        "dataset": dataset,
        "backbone_config": backbone_config,
        "preprocess": preprocess,
        "dtype": dtype,
        "views": views,
        "shard_size": shard_size,
    }
    return recipe_fingerprint(recipe)


def recipe_fingerprint(recipe: dict) -> str:
    """The fingerprint of a recipe: RECIPE_ATTRS of `recipe` (for instance a file's own attributes)."""
    hashed = {key: recipe.get(key) for key in RECIPE_ATTRS}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()


def check_recipe(path: Path, *, attrs: dict, names: Sequence[str]) -> None:
    """Refuse a file changed after it was made: its names must hash to its image_list_sha256 and its
    recipe attributes to its fingerprint, where it records them (as `run.py extract` does)."""
    is_shard = any(key in attrs for key in SHARD_ATTRS)  # a shard's hash covers every shard's names
    if "image_list_sha256" in attrs and not is_shard:
        if image_list_sha256(list(names)) != attrs["image_list_sha256"]:
            raise MadeDifferently(
                f"{path}: its image names do not hash to its image_list_sha256, so they were changed after "
                "the features were written (rows may be shifted); extract it again from scratch"
            )
    if "fingerprint" in attrs and all(key in attrs for key in RECIPE_ATTRS if key not in OPTIONAL_RECIPE):
        if recipe_fingerprint(attrs) != attrs["fingerprint"]:
            raise MadeDifferently(
                f"{path}: its attributes no longer give its fingerprint, so they were edited after "
                "extraction; extract it again from scratch"
            )


def finite_rows(features: np.ndarray) -> np.ndarray:
    """Per row, whether every value is finite (integer pixels always are)."""
    finite = np.ones(len(features), dtype=bool)
    flat = features.reshape(len(features), -1)
    if features.dtype.kind != "f" or flat.shape[1] == 0:
        return finite
    for start in range(0, len(flat), FINITE_CHUNK):
        finite[start : start + FINITE_CHUNK] = _finite(flat[start : start + FINITE_CHUNK])
    return finite


def _finite(rows: np.ndarray) -> np.ndarray:
    if rows.dtype != np.float16:
        return np.isfinite(rows).all(axis=1)
    # NaN and inf are the float16 values whose exponent bits are all ones: on the integer view, one AND
    # and a max per row. np.isfinite has no fast float16 path: 1.5 s for 112,120 x 2,048 here, this 0.3 s.
    bits = np.ascontiguousarray(rows).view(np.uint16)
    return (bits & np.uint16(0x7FFF)).max(axis=1) < 0x7C00


def library_versions() -> dict:
    """Installed versions of the libraries that shape the features ("" when absent)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def write_features(
    path: Path, *, names, features, status, errors, attrs: dict, projection: proj.Projection | None = None
) -> Path:
    """Write a whole feature file atomically: a temporary file, flushed, then renamed into place.

    `projection`: what reduced the channels of these tokens, stored with them (cache/README.md).
    """
    path = Path(path)
    attrs = {"schema_version": SCHEMA_VERSION, "created": _now(), **attrs}
    attrs.pop("projection", None)  # only the projection given describes these tokens
    names = np.asarray(names, dtype=object)
    status = np.asarray(status, dtype=np.int8)
    errors = np.asarray(errors, dtype=object)
    _check_attrs(path, attrs)
    # Convert in numpy: letting HDF5 convert float32 -> float16 on write is ~7x slower. Values that
    # overflow become inf, which _check_finite then refuses with a message.
    with np.errstate(over="ignore"):
        features = np.asarray(features).astype(attrs["dtype"], copy=False)
    _check(path, names=names, features=features, status=status, errors=errors, attrs=attrs)
    _check_finite(path, names=names, features=features)
    if projection is not None:
        attrs["projection"] = projection.attrs()
        _check_projection(path, projection, attrs=attrs, shape=features.shape)
    # The store alone stamps the checksums, over exactly the arrays it writes (any given ones are stale).
    attrs["checksums"] = crc.checksums(names=names, features=features, status=status, errors=errors)

    def fill(f: h5py.File) -> None:
        f.create_dataset("names", data=names, dtype=h5py.string_dtype())
        f.create_dataset("features", data=features)
        f.create_dataset("status", data=status)
        f.create_dataset("errors", data=errors, dtype=h5py.string_dtype())
        _write_projection(f, projection)
        _set_attrs(f, attrs)

    return _write_atomically(path, fill)


def _write_projection(f: h5py.File, projection: proj.Projection | None) -> None:
    if projection is None:
        return
    for field, name in proj.DATASETS.items():
        value = getattr(projection, field)
        string = field == "fit_names"
        f.create_dataset(name, data=value, dtype=h5py.string_dtype() if string else np.float32)


def _read_projection(path: Path, f: h5py.File, *, attrs: dict, shape: tuple) -> proj.Projection | None:
    """The file's projection, checked against its `projection` attribute and its features' `shape`."""
    stored = [name for name in proj.DATASETS.values() if name in f]
    if "projection" not in attrs:
        if stored:
            raise InputError(
                f"{path}: holds dataset(s) {stored} but no projection attribute, so nothing says what they "
                "are; extract it again (cache/README.md)"
            )
        return None
    arrays = {}
    for name in stored:
        dataset = f[name]
        arrays[name] = dataset.asstr()[()] if h5py.check_string_dtype(dataset.dtype) else dataset[()]
    projection = proj.from_arrays(path, attrs=attrs["projection"], arrays=arrays)
    _check_projection(path, projection, attrs=attrs, shape=shape)
    return projection


def _check_projection(path: Path, projection: proj.Projection, *, attrs: dict, shape: tuple) -> None:
    if attrs["kind"] != "tokens":
        raise InputError(
            f"{path}: a channel projection belongs to token maps (kind 'tokens'), not kind {attrs['kind']!r}"
        )
    proj.check_shapes(path, projection, attrs=attrs["projection"], channels=int(shape[-1]))


def _check_finite(path: Path, *, names: np.ndarray, features: np.ndarray) -> None:
    """NaN or inf features would train a head on garbage: refuse them, naming the first rows."""
    bad = np.flatnonzero(~finite_rows(features))
    if bad.size:
        first = ", ".join(map(str, names[bad[:3]]))
        raise InputError(
            f"{path}: features of {bad.size} row(s) are NaN or infinite (first: {first}); nothing written. "
            "Values beyond float16's range (65504) overflow: store float32 (extract.dtype)"
        )


def _write_atomically(path: Path, fill) -> Path:
    """Write `path` whole: `fill(h5py.File)` into a temporary file, flushed, closed, then renamed.

    Temporaries left by killed writers of the same file are removed first; on failure (a full disk) this
    one is removed too, and the file already under `path`, if any, is left as it was.
    """
    refuse_folder(path)

    def write(tmp: Path) -> None:
        with _open(tmp, "w") as f:
            fill(f)
            f.flush()

    return _replace(path, write)


def _replace(path: Path, write) -> Path:
    """`write(temporary path)`, then the temporary renamed to `path`; stale temporaries of `path` removed
    first, this one removed on failure, and a failed write one line naming `path`."""
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise InputError(_write_failure(path, err)) from None
        raise
    return path


def _write_failure(path: Path, err: OSError) -> str:
    """One line for a failed write; HDF5's own message spans lines and repeats the C call stack."""
    code = err.errno
    if code is None and "No space left on device" in str(err):
        code = errno.ENOSPC
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{os.strerror(code).lower()}: {path}; free some space and rerun (finished work is kept)"
    reason = os.strerror(code) if code else (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{path}: cannot be written ({reason})"


def read_attrs(path: Path) -> dict:
    """Root attributes of a feature file, JSON-valued ones decoded; refuses unknown schema versions."""
    path = Path(path)
    with _open(path, "r") as f:
        attrs = _get_attrs(path, f)
    _check_attrs(path, attrs)
    return attrs


def declared_features(path: Path) -> tuple[tuple[int, ...], str]:
    """The shape and dtype `features` declares, read from the header alone (nothing is loaded)."""
    with _open(Path(path), "r") as f:
        if not isinstance(f.get("features"), h5py.Dataset):
            raise InputError(f"{path}: dataset 'features' is missing; see cache/README.md for the format")
        return tuple(f["features"].shape), str(f["features"].dtype)


def read_features(path: Path, *, names: Sequence[str] | None = None) -> FeatureSet:
    """Read a feature file; with `names`, rows come back in that order and absent names as MISSING."""
    path = Path(path)
    with _open(path, "r") as f:
        attrs = _read_checked_attrs(path, f)
        check_declared(path, f, attrs=attrs, features=True)
        stored, status, errors = _read_columns(f)
        features = f["features"][()]
        projection = _read_projection(path, f, attrs=attrs, shape=features.shape)
    _check(path, names=stored, features=features, status=status, errors=errors, attrs=attrs)
    computed = crc.checksums(names=stored, features=features, status=status, errors=errors)
    _check_checksums(path, attrs=attrs, computed=computed)
    full = FeatureSet(path, stored, features, status, errors, attrs, projection)
    return full if names is None else _select(full, names)


def read_projection(path: Path) -> proj.Projection | None:
    """A token file's channel projection, checked against its features' declared shape; None without one
    (for readers that leave `features` on disk)."""
    path = Path(path)
    with _open(path, "r") as f:
        attrs = _read_checked_attrs(path, f)
        check_declared(path, f, attrs=attrs, features=False)
        return _read_projection(path, f, attrs=attrs, shape=f["features"].shape)


def read_status(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(names, status, errors) of a feature file without loading its features (for summaries)."""
    path = Path(path)
    with _open(path, "r") as f:
        attrs = _read_checked_attrs(path, f)
        check_declared(path, f, attrs=attrs, features=False)
        names, status, errors = _read_columns(f)
    computed = crc.Running().add(names=names, features=np.zeros(0), status=status, errors=errors).digests()
    _check_checksums(path, attrs=attrs, computed=computed, keys=("names", "status", "errors"))
    return names, status, errors


def check_rows(path: Path, *, chunk: int = 4096) -> None:
    """Check every stored row against the file's checksums, reading `chunk` rows at a time: for readers
    that take rows a few at a time (iter_rows) and so never hold the whole file."""
    path = Path(path)
    running = crc.Running()
    with _open(path, "r") as f:
        attrs = _read_checked_attrs(path, f)
        rows = check_declared(path, f, attrs=attrs, features=False)
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            names = f["names"].asstr()[part].astype(object)
            errors = f["errors"].asstr()[part].astype(object)
            running.add(names=names, features=f["features"][part], status=f["status"][part], errors=errors)
        _read_projection(path, f, attrs=attrs, shape=f["features"].shape)
    _check_checksums(path, attrs=attrs, computed=running.digests())


def _read_columns(f: h5py.File) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(names, status, errors) of an open file whose declared datasets were checked."""
    names = f["names"].asstr()[()].astype(object)
    return names, f["status"][()].astype(np.int8), f["errors"].asstr()[()].astype(object)


def _read_checked_attrs(path: Path, f: h5py.File) -> dict:
    """An open file's attributes, checked, with the row checksums every file of this version carries."""
    attrs = _get_attrs(path, f)
    _check_attrs(path, attrs)
    if "checksums" not in attrs:
        raise InputError(
            f"{path}: attribute checksums missing, so its rows cannot be checked; write it with "
            "cache.store.write_features, or add them as cache/README.md describes"
        )
    return attrs


def _check_checksums(path: Path, *, attrs: dict, computed: dict, keys=crc.CHECKED) -> None:
    """Refuse rows that are not the rows the store wrote (shifted, edited or damaged since)."""
    differ = crc.changed(attrs["checksums"], computed, keys=keys)
    if differ:
        raise MadeDifferently(
            f"{path}: its {' and '.join(differ)} do not match the checksums written with them, so its rows "
            "were changed after they were written (shifted, edited or damaged); extract it again from scratch"
        )


def iter_rows(path: Path, rows: Sequence[int], *, chunk: int) -> Iterator[np.ndarray]:
    """`features[rows]` of a file, `chunk` rows at a time in the order given; memory holds one chunk."""
    path = Path(path)
    rows = np.asarray(rows, dtype=np.int64)
    with _open(path, "r") as f:
        stored = check_declared(path, f, attrs=_read_checked_attrs(path, f), features=False)
        if len(rows) and not (0 <= rows.min() and rows.max() < stored):
            raise InputError(f"{path}: rows up to {int(rows.max())} asked for, but it holds {stored}")
        features = f["features"]
        for begin in range(0, len(rows), chunk):
            part = rows[begin : begin + chunk]
            order = np.argsort(part, kind="stable")
            wanted = part[order]
            lo, hi = int(wanted[0]), int(wanted[-1]) + 1
            # One contiguous read is far faster than an h5py point selection, and a shard's rows are
            # nearly always contiguous; scattered rows fall back to the selection (increasing order).
            block = features[lo:hi][wanted - lo] if hi - lo <= 2 * len(part) else features[wanted]
            out = np.empty_like(block)
            out[order] = block
            yield out


def shard_path(directory: Path, start: int, stop: int) -> Path:
    return Path(directory) / f"{start:09d}-{stop:09d}.h5"


def write_shard(
    directory: Path,
    *,
    start: int,
    stop: int,
    total_rows: int,
    names,
    features,
    status,
    errors,
    attrs: dict,
    projection: proj.Projection | None = None,
) -> Path:
    """Write one finished shard (rows start..stop of total_rows) atomically into `directory`."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(_write_failure(directory, err)) from None
    path = shard_path(directory, start, stop)
    shard_attrs = {**attrs, "shard_start": start, "shard_stop": stop, "shard_total_rows": total_rows}
    return write_features(
        path,
        names=names,
        features=features,
        status=status,
        errors=errors,
        attrs=shard_attrs,
        projection=projection,
    )


def save_fitted(directory: Path, projection: proj.Projection, *, fingerprint: str) -> Path:
    """Keep a fitted projection in the shard directory (temporary file + rename) before any shard is
    written with it, so that a resumed extraction projects its remaining shards alike."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(_write_failure(Path(directory), err)) from None
    return write_projection(Path(directory) / FITTED, projection, fingerprint=fingerprint)


def write_projection(path: Path, projection: proj.Projection, *, fingerprint: str = "") -> Path:
    """A projection on its own as a .npz (temporary file + rename): a shard directory's fitted one, or
    the one a run trained on projected tokens keeps; `fingerprint`: the recipe it was fitted for."""
    path = Path(path)
    arrays = {field: getattr(projection, field) for field in proj.DATASETS}
    arrays["fit_names"] = np.asarray(projection.fit_names, dtype=str)  # no pickled objects

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            np.savez(out, **arrays, attrs=np.asarray(json.dumps(projection.attrs())), fingerprint=fingerprint)
            out.flush()
            os.fsync(out.fileno())

    return _replace(path, write)


def load_fitted(directory: Path, *, fingerprint: str) -> proj.Projection | None:
    """The projection saved by save_fitted for this recipe, None where there is none; one saved for
    another recipe is refused."""
    path = Path(directory) / FITTED
    if not path.is_file():
        return None
    return read_projection_file(path, fingerprint=fingerprint)


def read_projection_file(path: Path, *, fingerprint: str | None = None) -> proj.Projection:
    """A projection written by write_projection, checked for shape and digest; with `fingerprint`, one
    fitted for another recipe is refused."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
    except (OSError, ValueError) as err:
        raise MadeDifferently(f"{path} cannot be read ({err}); delete it or start over") from None
    if fingerprint is not None and str(arrays.get("fingerprint")) != fingerprint:
        raise MadeDifferently(f"{path} was fitted for another recipe (fingerprint); start over")
    attrs = json.loads(str(arrays["attrs"]))
    named = {name: arrays[field] for field, name in proj.DATASETS.items() if field in arrays}
    return proj.from_arrays(path, attrs=attrs, arrays=named)


def finished_shards(directory: Path, *, wanted: dict) -> dict[tuple[int, int], Path]:
    """Shards already written with `wanted["fingerprint"]`; a shard made by another recipe is refused."""
    done = {}
    for path in _shard_files(directory):
        attrs = _shard_attrs(path)
        if attrs.get("fingerprint") != wanted["fingerprint"]:
            differ = recipe_differences(found=attrs, wanted=wanted)
            raise MadeDifferently(f"{recipe_mismatch(path, differ=differ)}; start over")
        done[(attrs["shard_start"], attrs["shard_stop"])] = path
    return done


def recipe_differences(*, found: dict, wanted: dict) -> list[str]:
    """What differs between a stored recipe (RECIPE_ATTRS) and the wanted one, for people: "views: 1 stored,
    4 now" for a plain value, "preprocess.size" for a key of a table.

    A key that only one side's table has is left out when a plain value differs too: it comes with that
    setting (extraction records the augmented views' seed only when there are views).
    """
    # Compare as stored: JSON turns tuples into lists.
    wanted = json.loads(json.dumps({"schema_version": SCHEMA_VERSION, **wanted}, default=str))
    plain, tables = [], []
    for key in RECIPE_ATTRS:
        old, new = found.get(key), wanted.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            tables += [
                (key, k, k in old and k in new) for k in sorted({*old, *new}) if old.get(k) != new.get(k)
            ]
        elif any(isinstance(v, str) and len(v) > 16 for v in (old, new)):
            plain.append(key)  # a hash: its value tells a person nothing
        else:
            plain.append(f"{key}: {old} stored, {new} now")
    return plain + [f"{key}.{k}" for key, k, both in tables if both or not plain]


def recipe_mismatch(path: Path, *, differ: Sequence[str]) -> str:
    """The refusal for a file made by another recipe, naming what differs."""
    return f"{path} was made differently from this run ({'; '.join(differ or ['fingerprint'])})"


def discard_shards(directory: Path, *, fingerprint: str, ranges: Sequence[tuple[int, int]]) -> int:
    """Delete shards made by another recipe and the shards in `ranges` (for --force); returns the count."""
    ranges = set(ranges)
    removed = 0
    for path in _shard_files(directory):
        try:
            attrs = _shard_attrs(path)
            keep = (
                attrs.get("fingerprint") == fingerprint
                and (attrs["shard_start"], attrs["shard_stop"]) not in ranges
            )
        except InputError:
            keep = False
        if not keep:
            path.unlink(missing_ok=True)
            removed += 1
    fitted = Path(directory) / FITTED
    try:
        load_fitted(directory, fingerprint=fingerprint)  # the same recipe's fit is kept, as its shards are
    except InputError:
        fitted.unlink(missing_ok=True)
        removed += 1
    for start, stop in ranges:
        remove_stale_temps(shard_path(directory, start, stop))
    return removed


def merge_shards(directory: Path, *, out_path: Path) -> Path:
    """Join every shard in `directory` into one file at `out_path` (temporary file + rename).

    Streams one shard at a time into preallocated datasets, so memory does not grow with the image count.
    """
    directory, out_path = Path(directory), Path(out_path)
    shards = _complete_shards(directory)
    first = read_features(shards[0])
    total = first.attrs["shard_total_rows"]
    attrs = {k: v for k, v in first.attrs.items() if k not in SHARD_ATTRS}
    attrs["created"] = _now()
    running = crc.Running()  # the merged file's checksums, over the rows as they are copied

    def fill(out: h5py.File) -> None:
        string = h5py.string_dtype()
        out.create_dataset("names", shape=(total,), dtype=string)
        out.create_dataset("features", shape=(total, *first.features.shape[1:]), dtype=first.features.dtype)
        out.create_dataset("status", shape=(total,), dtype=np.int8)
        out.create_dataset("errors", shape=(total,), dtype=string)
        _write_projection(out, first.projection)
        for path in shards:
            part = read_features(path)
            _check_same_projection(path, part.projection, first.projection)
            rows = slice(part.attrs["shard_start"], part.attrs["shard_stop"])
            for key in DATASETS:
                out[key][rows] = getattr(part, key)
            running.add(**{key: getattr(part, key) for key in DATASETS})
        _set_attrs(out, {**attrs, "checksums": running.digests()})

    return _write_atomically(out_path, fill)


def _check_same_projection(path: Path, found, wanted) -> None:
    """Every shard of a file was projected alike (workers that each fitted their own might not be)."""
    digests = [p.digest() if p is not None else None for p in (found, wanted)]
    if digests[0] != digests[1]:
        raise MadeDifferently(
            f"{path} was projected differently from the first shard of {path.parent} (another fitted "
            "projection); start over"
        )


def _complete_shards(directory: Path) -> list[Path]:
    """All shard paths in row order, checked to share one fingerprint and to cover every row."""
    by_range = {}
    fingerprints = set()
    for path in _shard_files(directory):
        attrs = _shard_attrs(path)
        fingerprints.add(attrs.get("fingerprint"))
        by_range[(attrs["shard_start"], attrs["shard_stop"])] = (path, attrs)
    if not by_range:
        raise InputError(f"{directory}: no finished shards to merge; extract first")
    if len(fingerprints) > 1:
        raise MadeDifferently(
            f"{directory} holds shards made by {len(fingerprints)} different recipes (fingerprints); "
            "start over"
        )
    _, attrs = next(iter(by_range.values()))
    expected = shard_ranges(attrs["shard_total_rows"], attrs["shard_size"])
    missing = [r for r in expected if r not in by_range]
    if missing:
        first = ", ".join(f"rows {a}-{b}" for a, b in missing[:3])
        raise InputError(
            f"{directory}: {len(missing)} of {len(expected)} shards are not finished yet ({first}, ...); "
            "let the extraction workers of the other shards finish, then merge"
        )
    return [by_range[r][0] for r in expected]


def _shard_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    return sorted(directory.glob("*.h5")) if directory.is_dir() else []


def _shard_attrs(path: Path) -> dict:
    attrs = read_attrs(path)
    if any(key not in attrs for key in (*SHARD_ATTRS, "shard_size", "fingerprint")):
        raise MadeDifferently(
            f"{path} is not a shard file (shard attributes missing); delete it or start over"
        )
    return attrs


def _select(full: FeatureSet, names: Sequence[str]) -> FeatureSet:
    """Rows of `full` in the order of `names`; names it lacks come back MISSING with zero features."""
    names = np.asarray(list(names), dtype=object)
    rows = positions(names, among=full.names)
    found = rows >= 0
    features = np.zeros((len(names), *full.features.shape[1:]), dtype=full.features.dtype)
    features[found] = full.features[rows[found]]
    status = np.full(len(names), Status.MISSING, dtype=np.int8)
    status[found] = full.status[rows[found]]
    errors = np.full(len(names), "not in cache", dtype=object)
    errors[found] = full.errors[rows[found]]
    return FeatureSet(full.path, names, features, status, errors, full.attrs, full.projection)


def _check_attrs(path: Path, attrs: dict) -> None:
    version = attrs.get("schema_version")
    if version is None:
        raise InputError(
            f"{path}: no 'schema_version' attribute; this is not a cxr14 feature file (cache/README.md)"
        )
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(
            f"{path}: attribute schema_version is the {type(version).__name__} {version!r}; it must be the "
            f"integer {SCHEMA_VERSION} (cache/README.md)"
        )
    if version != SCHEMA_VERSION:
        older = (
            " (version 2 added the rows' checksums and the data set's fingerprint)" if version == 1 else ""
        )
        raise InputError(
            f"{path}: schema_version {version}, but this code reads version {SCHEMA_VERSION}{older}; "
            "extract it again from scratch, or rewrite it as cache/README.md describes"
        )
    missing = [key for key in REQUIRED_ATTRS if key not in attrs]
    if missing:
        raise InputError(f"{path}: required attribute(s) {missing} missing; see cache/README.md")
    _check_types(path, attrs)
    kind, dtype = attrs["kind"], attrs["dtype"]
    if kind not in DTYPES:
        raise InputError(f"{path}: attribute kind={kind!r}; expected one of {sorted(DTYPES)}")
    if dtype not in DTYPES[kind]:
        raise InputError(
            f"{path}: attribute dtype={dtype!r} for kind {kind!r}; expected one of {DTYPES[kind]}"
        )
    if attrs["views"] < 1:
        raise InputError(f"{path}: attribute views={attrs['views']!r}; expected an integer >= 1")


def _check_types(path: Path, attrs: dict) -> None:
    """Every attribute the format names has its type (a string, an integer, a JSON object or list)."""
    spelled = {str: "a string", int: "an integer", dict: "a JSON object", list: "a JSON list"}
    accepted = {str: str, int: (int, np.integer), dict: dict, list: list}
    for key, wanted in ATTR_TYPES.items():
        value = attrs.get(key)
        if value is not None and (not isinstance(value, accepted[wanted]) or isinstance(value, bool)):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise InputError(
                f"{path}: attribute {key} is the {type(value).__name__} {shown}; expected {spelled[wanted]} "
                "(cache/README.md)"
            )


def _check(path: Path, *, names, features, status, errors, attrs: dict) -> None:
    """The schema, checked on every write and every read."""
    _check_attrs(path, attrs)
    n = len(names)
    for key, array in (("features", features), ("status", status), ("errors", errors)):
        if len(array) != n:
            raise InputError(f"{path}: '{key}' has {len(array)} rows but 'names' has {n}")
    if len(set(names)) != n:
        raise InputError(f"{path}: 'names' holds duplicate image names; each image must appear once")
    if str(features.dtype) != attrs["dtype"]:
        raise InputError(f"{path}: features are {features.dtype} but attribute dtype is {attrs['dtype']!r}")
    item_dims = ITEM_DIMS[attrs["kind"]]
    views = attrs["views"]
    expected = 1 + item_dims + (views > 1)
    if features.ndim != expected or (views > 1 and features.shape[1] != views):
        raise InputError(
            f"{path}: features have shape {features.shape}; kind {attrs['kind']!r} with views={views} needs "
            f"{expected} dimensions" + (f" with {views} views on axis 1" if views > 1 else "")
        )
    unknown = sorted(set(np.unique(status).tolist()) - {s.value for s in Status})
    if unknown:
        raise InputError(
            f"{path}: status codes {unknown} are unknown; valid: {[(s.name, s.value) for s in Status]}"
        )


def _set_attrs(f: h5py.File, attrs: dict) -> None:
    for key, value in attrs.items():
        if value is None:  # HDF5 has no null: an attribute not known is not written
            continue
        f.attrs[key] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else value


def _get_attrs(path: Path, f: h5py.File) -> dict:
    attrs = {}
    for key, value in f.attrs.items():
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        elif isinstance(value, np.generic):
            value = value.item()
        attrs[key] = _decode_json(path, key, value) if key in JSON_ATTRS and isinstance(value, str) else value
    return attrs


def _decode_json(path: Path, key: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path}: attribute {key} is not JSON ({err.msg} at character {err.pos}); it must be a JSON "
            "object (cache/README.md)"
        ) from None


def _open(path: Path, mode: str) -> h5py.File:
    # No HDF5 file locks: writers only ever write private temporary files and readers only see renamed,
    # complete ones, and locks fail on many shared file systems (NFS, Lustre) used by job arrays.
    if mode != "r":
        return h5py.File(path, mode, locking=False)
    refuse_folder(path)
    if not Path(path).exists():
        raise InputError(f"{path}: no such feature file; extract it first")
    try:
        return h5py.File(path, mode, locking=False)
    except OSError as err:
        raise InputError(f"{path} cannot be read as HDF5 ({err}); delete it or start over") from err


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
