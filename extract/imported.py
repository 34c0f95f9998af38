"""Readers of embedding files made elsewhere, one per layout `run.py import-features` takes. Each yields
one (file, image id, array) at a time, so an import holds no more than the shard it is gathering.

These read foreign files, never the store's own: a feature file is written only by cache/store.py.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cxr14.errors import InputError
from extract.settings import IMPORT_LAYOUTS

LAYOUTS = IMPORT_LAYOUTS
SUFFIXES = {
    ".npz": "npz",
    ".tfrecord": "v1-tfrecord",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".npy": "npy",
    ".parquet": "parquet",
    ".pq": "parquet",
}
V1_KEY = "embedding"
ID_COLUMN = "Image Index"  # the CSV's own name for an image id: the default id column
NPY_CHUNK = 1024  # rows read from a .npy at a time
IMAGE_ID = re.compile(r"^\d{8}_\d{3}(\.png)?$")


class Row(NamedTuple):
    where: Path  # the file the row came from (named in every error about it)
    id: str
    value: np.ndarray


@dataclass(frozen=True)
class Source:
    """An embedding file or folder and how to read it."""

    path: Path
    layout: str
    files: tuple[Path, ...]  # every file the rows come from: what the fingerprint hashes
    key: str = ""  # hdf5: the array's path inside each group; v1-npz / v1-tfrecord: the vector's key
    names: Path | None = None  # npy: the CSV of image ids, one per matrix row
    id_column: str = ""  # npy names CSV, parquet: the id column ("" = ID_COLUMN, or a lone column)


def uses_tensorflow(path: Path) -> bool:
    """Whether reading `path` needs TensorFlow (tfrecords): the command line then loads it quietly."""
    path = Path(path)
    return path.suffix == ".tfrecord" or (path.is_dir() and any(path.glob("*.tfrecord")))


def open_source(
    path: Path, *, layout: str = "auto", key: str = "", names: Path | None = None, id_column: str = ""
) -> Source:
    """The source at `path`, its layout found from its name (or `layout`), refused when it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder to import")
    found, files = _layout_of(path) if layout == "auto" else (layout, _files_of(path, layout))
    if found not in LAYOUTS:
        raise InputError(f"import layout {found!r} is not one of: {', '.join(LAYOUTS)}")
    if found.startswith("v1-"):
        key = key or V1_KEY
    if found == "npy":
        if names is None:
            raise InputError(f"{path}: a .npy matrix needs --names CSV, the image id of each of its rows")
        files += (Path(names),)
    return Source(path, found, files, key=key, names=names, id_column=id_column)


def _layout_of(path: Path) -> tuple[str, tuple[Path, ...]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        kinds = {p.suffix for p in files}
        if kinds == {".npz"}:
            return "v1-npz", tuple(files)
        if kinds == {".tfrecord"}:
            return "v1-tfrecord", tuple(files)
        raise InputError(
            f"{path}: a folder to import holds one .npz or one .tfrecord per image and nothing else; "
            f"found {sorted(kinds) or 'no files'}"
        )
    layout = SUFFIXES.get(path.suffix.lower())
    if layout is None:
        raise InputError(
            f"{path}: cannot tell its layout from the name; expected one of {', '.join(sorted(SUFFIXES))} "
            "or a folder of per-image files (or pass --layout)"
        )
    if layout == "npz" and _npz_members(path) == [V1_KEY]:
        layout = "v1-npz"  # a single v1 file: one image, its vector under `embedding`
    return layout, (path,)


def _files_of(path: Path, layout: str) -> tuple[Path, ...]:
    if not path.is_dir():
        return (path,)
    suffix = ".tfrecord" if layout == "v1-tfrecord" else ".npz"
    return tuple(sorted(p for p in path.glob(f"*{suffix}") if not p.name.startswith(".")))


def _npz_members(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return list(archive.files)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable .npz ({err})") from None


def read_rows(source: Source) -> Iterator[Row]:
    """Every (file, id, array) of `source`, one at a time, in the file's own order."""
    readers = {
        "npz": lambda: _npz_rows(source.files[0]),
        "v1-npz": lambda: _v1_npz_rows(source.files, key=source.key),
        "v1-tfrecord": lambda: _tfrecord_rows(source.files, key=source.key),
        "hdf5": lambda: _hdf5_rows(source.path, key=source.key),
        "npy": lambda: _npy_rows(source.path, names=source.names, id_column=source.id_column),
        "parquet": lambda: _parquet_rows(source.path, id_column=source.id_column),
    }
    return readers[source.layout]()


def file_id(path: Path) -> str:
    """A per-image file's image id: its name less the last suffix (00000001_000.png.npz -> ...png)."""
    return Path(path).name[: -len(Path(path).suffix)]


def _npz_rows(path: Path) -> Iterator[Row]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:  # each member is read only when asked for
                yield Row(path, key, archive[key])
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable .npz of arrays ({err})") from None


def _v1_npz_rows(files: tuple[Path, ...], *, key: str) -> Iterator[Row]:
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as archive:
                if key not in archive.files:
                    raise InputError(f"{path}: no array {key!r} (it holds {archive.files}); pass --key NAME")
                value = archive[key]
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: not a readable .npz ({err})") from None
        yield Row(path, file_id(path), value)


def _tfrecord_rows(files: tuple[Path, ...], *, key: str) -> Iterator[Row]:
    import tensorflow as tf

    for path in files:
        try:
            records = [r.numpy() for r in tf.data.TFRecordDataset(str(path)).take(2)]
            example = tf.train.Example.FromString(records[0]) if len(records) == 1 else None
        except (tf.errors.OpError, ValueError) as err:
            raise InputError(f"{path}: not a readable tfrecord ({type(err).__name__})") from None
        if example is None:
            raise InputError(f"{path}: {len(records) or 'no'} records; a v1 file holds one image's record")
        feature = example.features.feature
        if key not in feature or not feature[key].float_list.value:
            raise InputError(f"{path}: no float feature {key!r} (it has {sorted(feature)}); pass --key NAME")
        yield Row(path, file_id(path), np.asarray(feature[key].float_list.value, dtype=np.float32))


def _hdf5_rows(path: Path, *, key: str) -> Iterator[Row]:
    import h5py

    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as err:
        raise InputError(f"{path} cannot be read as HDF5 ({err})") from None
    with f:
        if not key:
            raise InputError(
                f"{path}: pass --key PATH, the array inside each image's group (the first holds: "
                f"{', '.join(_datasets_in(f)) or 'nothing'})"
            )
        for name in f:  # one group per image, named by its id
            item = f[name]
            if not isinstance(item, h5py.Group) or not isinstance(item.get(key), h5py.Dataset):
                raise InputError(f"{path}: image {name} has no dataset {key!r} (pass --key PATH)")
            yield Row(path, name, item[key][()])


def _datasets_in(f) -> list[str]:
    """Dataset paths inside the file's first group, for the error that asks for --key."""
    import h5py

    first = next(iter(f.values()), None)
    found = []
    if isinstance(first, h5py.Group):
        first.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    return found[:8]


def _npy_rows(path: Path, *, names: Path, id_column: str) -> Iterator[Row]:
    ids = read_ids(Path(names), id_column=id_column)
    with open(path, "rb") as f:
        shape, dtype = _npy_header(path, f)
        if not shape or shape[0] != len(ids):
            raise InputError(f"{path}: {shape[0] if shape else 0} rows, but {names} names {len(ids)} images")
        per_row = int(np.prod(shape[1:], dtype=np.int64))
        # Read in chunks from the file, not through a memory map: mapped pages stay resident and count.
        for start in range(0, len(ids), NPY_CHUNK):
            count = min(NPY_CHUNK, len(ids) - start)
            block = np.fromfile(f, dtype=dtype, count=count * per_row)
            if block.size != count * per_row:
                raise InputError(f"{path}: the file ends before row {start + block.size // max(per_row, 1)}")
            block = block.reshape(count, *shape[1:])
            for i in range(count):
                yield Row(path, ids[start + i], block[i])


def _npy_header(path: Path, f) -> tuple[tuple, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(f)
    except ValueError as err:
        raise InputError(f"{path}: not a .npy file ({err})") from None
    if fortran or dtype.hasobject or dtype.kind not in "fiu":
        raise InputError(
            f"{path}: a .npy of {dtype} in {'Fortran' if fortran else 'C'} order; store C-order numbers"
        )
    return shape, dtype


def read_ids(path: Path, *, id_column: str = "") -> list[str]:
    """Image ids from a names CSV: its `id_column` (default "Image Index", or its only column); a file of
    bare names, one a line, has no header."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable names CSV ({err})") from None
    if frame.shape[1] == 1 and not id_column and IMAGE_ID.match(str(frame.columns[0]).strip()):
        return [str(frame.columns[0]).strip(), *(s.strip() for s in frame.iloc[:, 0])]
    column = _id_column(path, list(frame.columns), id_column)
    return [s.strip() for s in frame[column]]


def _id_column(path: Path, columns: list[str], wanted: str) -> str:
    if wanted or len(columns) != 1:
        wanted = wanted or ID_COLUMN
        if wanted not in columns:
            raise InputError(
                f"{path}: no id column {wanted!r} (columns: {', '.join(map(str, columns[:8]))}); "
                "pass --id-column NAME"
            )
        return wanted
    return columns[0]


def _parquet_rows(path: Path, *, id_column: str) -> Iterator[Row]:
    frame = read_parquet(path)
    column = _id_column(path, [str(c) for c in frame.columns], id_column or ID_COLUMN)
    ids = frame.pop(column).astype(str).str.strip().tolist()
    if frame.shape[1] == 1 and frame.dtypes.iloc[0].kind == "O":
        vectors = frame.iloc[:, 0]  # one column holding a vector per row
        for i, image in enumerate(ids):
            yield Row(path, image, np.asarray(vectors.iloc[i], dtype=np.float32))
        return
    wrong = [str(c) for c, t in frame.dtypes.items() if t.kind not in "fiu"]
    if wrong or frame.shape[1] == 0:
        raise InputError(
            f"{path}: besides the id column {column!r}, every column must be a number (one per value) or "
            f"a single column of vectors; {', '.join(wrong[:3]) or 'no columns'}"
        )
    values = frame.to_numpy(dtype=np.float32)
    for i, image in enumerate(ids):
        yield Row(path, image, values[i])


def read_parquet(path: Path):
    """The parquet file as a DataFrame, through pandas' reader (its engine, pyarrow, is not a dependency)."""
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except ImportError:
        raise InputError(
            f"{path}: reading parquet needs pandas' parquet extra, which cxr14 does not install: "
            'pip install "pandas[parquet]" (pyarrow)'
        ) from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable parquet file ({err})") from None
