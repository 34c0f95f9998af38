"""A feature file's `features` left on disk and read a block of rows at a time: for a token cache larger
than the memory budget ([train] token_memory_gb). The store checks the file as it does for a whole read
(schema, declared shapes, every row against its checksums, NaN and inf), in one streamed pass."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cache.checksums import Running
from cache.limits import check_declared

# The store's own opener and schema checks: the store owns the format, this module only reads it in blocks.
from cache.store import (
    FeatureSet,
    _check,
    _check_checksums,
    _open,
    _read_checked_attrs,
    _read_columns,
    _read_projection,
    finite_rows,
)
from cxr14.errors import InputError

# Rows are read in contiguous blocks of about this many bytes: large enough that one HDF5 call costs far
# less than the bytes it moves (~30 us a call here, 16 MB ~5 ms from the page cache), small enough that a
# shuffle buffer of a fifth of a 1 GB budget mixes a dozen blocks.
BLOCK_BYTES = 16 << 20
# Wanted rows closer than this many bytes apart are read in one slice with the rows between them. Copying
# the rows out of a slice costs more than the h5py calls it saves: the training rows of a 20,000 x 49 x 256
# cache, from the page cache, read in 0.36 s as 1,135 runs of consecutive rows, in 0.66 s as 120 slices
# bridging holes of up to 10 rows.
GAP_BYTES = 64 << 10
# Outside training (the probe start's passes, prediction) a cache is handled this many bytes of rows at a
# time, counted at the widest type a pass turns them into (float64 in the token scale), and within a fifth
# of a streamed cache's budget: 4,096 rows a pass read whatever the width held 0.8 GB of float16 and
# 3.3 GB of float64 temporaries at ResNet-50's 49 x 2,048.
CHUNK_BYTES = 64 << 20
CHUNK_SHARE = 0.2


class StreamedFeatures:
    """Rows of a feature file's `features`, in this object's order, read from disk when indexed.

    Indexing with a slice or an integer array reads those rows and returns a numpy array, like an array
    held in memory; `take(rows)` is a lazy subset. Turning the whole object into an array is refused: the
    point of it is that the cache does not fit in memory.
    """

    def __init__(self, path: Path, *, positions, item_shape, dtype, budget_bytes: int, block_rows: int):
        self.path = Path(path)
        self.positions = np.asarray(positions, dtype=np.int64)  # stored row of each row of this object
        self.item_shape, self.dtype = tuple(item_shape), np.dtype(dtype)
        self.budget_bytes = int(budget_bytes)  # what the rows held in memory at once may take
        self.block_rows = int(block_rows)  # stored rows per read: whole HDF5 chunks where it has chunks
        self.finite: np.ndarray | None = None  # per stored row, from the checking pass (None on a subset)

    @property
    def shape(self) -> tuple:
        return (len(self.positions), *self.item_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.item_shape)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.item_shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, rows) -> "StreamedFeatures":
        """The rows `rows` of this object, still on disk."""
        return StreamedFeatures(
            self.path,
            positions=self.positions[np.asarray(rows, dtype=np.int64)],
            item_shape=self.item_shape,
            dtype=self.dtype,
            budget_bytes=self.budget_bytes,
            block_rows=self.block_rows,
        )

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple) or not (isinstance(key, slice) or np.ndim(key) == 1):
            raise TypeError(f"a streamed cache is indexed by a slice or an array of rows, not {key!r}")
        with self.reading() as read:
            return read(self.positions[key])

    def __array__(self, dtype=None, copy=None):
        raise InputError(
            f"{self.path}: this token cache is larger than [train] token_memory_gb, so it is streamed from "
            "disk, and this step needs it whole in memory (a sweep trains its trials together on cached "
            "arrays); raise token_memory_gb if the machine has the memory, or train it with train-head"
        )

    @contextlib.contextmanager
    def reading(self) -> Iterator:
        """A function of stored rows (any order) giving their features, the file held open meanwhile."""
        with _open(self.path, "r") as f:
            dataset = f["features"]
            yield lambda positions: read_rows(dataset, positions, block_rows=self.block_rows)


def read_rows(dataset, positions: np.ndarray, *, block_rows: int) -> np.ndarray:
    """`dataset[positions]` in the order given, read as contiguous slices in increasing order: h5py's own
    point selection is far slower, and rows a little apart are cheaper read with the rows between them."""
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty((len(positions), *dataset.shape[1:]), dtype=dataset.dtype)
    if not len(positions):
        return out
    order = np.argsort(positions, kind="stable")
    wanted = positions[order]
    row_bytes = max(1, out[:1].nbytes)
    gap = max(1, GAP_BYTES // row_bytes)
    for begin, end in _runs(wanted, gap=gap, most=block_rows):
        lo, hi = int(wanted[begin]), int(wanted[end - 1]) + 1
        block = dataset[lo:hi]
        every = hi - lo == end - begin and (np.diff(wanted[begin:end]) > 0).all()  # each row once: no copy
        out[order[begin:end]] = block if every else block[wanted[begin:end] - lo]
    return out


def _runs(wanted: np.ndarray, *, gap: int, most: int) -> list[tuple[int, int]]:
    """(begin, end) index ranges of sorted `wanted` whose rows lie at most `gap` apart and span at most
    `most` stored rows: each is read with one slice."""
    breaks = np.flatnonzero(np.diff(wanted) > gap) + 1
    runs = []
    for begin, end in zip(np.r_[0, breaks], np.r_[breaks, len(wanted)], strict=True):
        while begin < end:
            stop = begin + int(np.searchsorted(wanted[begin:end], wanted[begin] + most))
            runs.append((int(begin), stop))
            begin = stop
    return runs


def stream_features(path: Path, *, budget_bytes: int) -> FeatureSet:
    """A feature file whose `features` stay on disk (a StreamedFeatures), checked as read_features checks
    a file it loads: schema and declared shapes, then one pass over every row for the checksums and the
    rows holding NaN or inf. Only single-view token or feature files stream."""
    path = Path(path)
    with _open(path, "r") as f:
        attrs = _read_checked_attrs(path, f)
        rows = check_declared(path, f, attrs=attrs, features=False)
        names, status, errors = _read_columns(f)
        dataset = f["features"]
        if attrs["views"] > 1 or attrs["kind"] == "pixels":
            raise InputError(
                f"{path}: a cache of kind {attrs['kind']!r} with {attrs['views']} views is larger than "
                "[train] token_memory_gb, and only single-view feature or token caches are streamed from "
                "disk; raise token_memory_gb if this machine has the memory"
            )
        # The schema's checks of the rows, on a stand-in of the features' shape that holds no memory.
        shaped = np.broadcast_to(np.zeros((), dataset.dtype), dataset.shape)
        _check(path, names=names, features=shaped, status=status, errors=errors, attrs=attrs)
        block = rows_per_block(dataset)
        finite, computed = _scan(dataset, rows=rows, block=block, names=names, status=status, errors=errors)
        item_shape, dtype = dataset.shape[1:], dataset.dtype
        projection = _read_projection(path, f, attrs=attrs, shape=dataset.shape)
    _check_checksums(path, attrs=attrs, computed=computed)
    streamed = StreamedFeatures(
        path,
        positions=np.arange(rows),
        item_shape=item_shape,
        dtype=dtype,
        budget_bytes=budget_bytes,
        block_rows=block,
    )
    streamed.finite = finite
    return FeatureSet(path, names, streamed, status, errors, attrs, projection)


def rows_per_block(dataset) -> int:
    """Stored rows per read: about BLOCK_BYTES, and whole HDF5 chunks where the dataset is chunked (the
    store writes it contiguous, so any row range reads in one piece; a file of one's own may be chunked,
    and a read that cuts a chunk decodes all of it)."""
    row_bytes = int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize
    rows = max(1, BLOCK_BYTES // max(1, row_bytes))
    chunk = dataset.chunks[0] if dataset.chunks else 1
    return max(chunk, rows // chunk * chunk)


def _scan(dataset, *, rows: int, block: int, names, status, errors) -> tuple[np.ndarray, dict]:
    """One pass over `features`, `block` rows at a time: which rows are finite, and the file's checksums."""
    running = Running().add(names=names, features=np.zeros(0), status=status, errors=errors)
    finite = np.ones(rows, dtype=bool)
    for begin in range(0, rows, block):
        part = dataset[begin : begin + block]
        # Empty names, status and errors leave their checksums as they are: only the features move on.
        running.add(names=[], features=part, status=np.zeros(0), errors=[])
        finite[begin : begin + block] = finite_rows(part)
    return finite, running.digests()


def chunk_rows(features, *, itemsize: int, most_bytes: int | None = None) -> int:
    """Rows of `features` handled at a time: their values at `itemsize` bytes each take at most
    `most_bytes` (CHUNK_BYTES), and at most CHUNK_SHARE of a streamed cache's budget; at least one row."""
    values = int(np.prod(features.shape[1:], dtype=np.int64))
    most_bytes = CHUNK_BYTES if most_bytes is None else most_bytes
    if isinstance(features, StreamedFeatures):
        most_bytes = min(most_bytes, int(features.budget_bytes * CHUNK_SHARE))
    return max(1, most_bytes // max(1, values * itemsize))


def finite_rows_of(features) -> np.ndarray:
    """Per row, whether every value is finite: from the checking pass for a streamed file."""
    if isinstance(features, StreamedFeatures):
        return features.finite
    return finite_rows(features)


def read_through(path: Path) -> int:
    """Read every row of a file's features once, in order a block at a time, keeping none; the bytes read.
    The time of it is the floor of a streamed epoch, which reads each training row once."""
    with _open(Path(path), "r") as f:
        dataset = f["features"]
        block = rows_per_block(dataset)
        for begin in range(0, len(dataset), block):
            dataset[begin : begin + block]
        return dataset.size * dataset.dtype.itemsize
