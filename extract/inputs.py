"""Where stage one's images come from: PNG files under the data folder, or a pixel cache made earlier.

A pixel cache (`source = "pixels"`, uint8, one view) read in place of the PNGs skips decoding: a new
backbone then costs reading and resizing stored pixels. Its features differ slightly from PNG ones,
because the image is resampled twice (to the cache's size, then to the backbone's); docs/stage-one.md says by how much.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from cache import store
from cache.origin import check_origin
from cache.status import Status
from cxr14.errors import Fix, InputError
from cxr14.names import positions
from dataset import image_loader

CHUNK_ROWS = 64  # stored images read per HDF5 access: 16 MB at 512 px


@dataclass(frozen=True)
class PngInput:
    """PNG files: `paths[i]` is the image of row i ("" when the index names an image with no file).

    Images with more than `max_pixels` pixels (read from their header) are recorded as failed, not decoded.
    """

    paths: np.ndarray
    max_pixels: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "paths", np.asarray(self.paths, dtype=object))

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> dict:
        """What the fingerprint records about the input."""
        return {"source": "png", "decode": "png gray [0,1], 8/16-bit"}

    def check_backbones(self, backbones: Sequence) -> None:
        """Any backbone can read PNGs."""

    def check(self, rows: Sequence[int]) -> dict[int, tuple[Status, str]]:
        """The cheap per-file check (no decoding) of each row."""
        return {
            int(row): image_loader.check_file(self.paths[row], max_pixels=self.max_pixels) for row in rows
        }

    def source(self, rows: np.ndarray) -> image_loader.PngFiles:
        """What make_dataset reads for `rows` (all passed `check`)."""
        return image_loader.PngFiles(paths=self.paths[rows], rows=rows)

    def explain(self, row: int) -> tuple[Status, str]:
        """Why a row that passed `check` was dropped: decoding it failed."""
        return Status.UNDECODABLE, image_loader.decode_error(self.paths[row])


@dataclass(frozen=True)
class StoredPixels:
    """Rows of a pixel cache as a make_dataset source: `cache_rows[i]` of the file holds row `rows[i]`."""

    path: Path
    cache_rows: np.ndarray
    rows: np.ndarray
    size: int
    may_fail = False  # every row read was stored as OK; a read error is a broken file and must stop the run

    def __len__(self) -> int:
        return len(self.rows)

    def items(self, start: tf.Tensor, stop: tf.Tensor) -> tf.data.Dataset:
        """`(row, uint8 (S, S))` for positions start..stop, read from the file in chunks."""
        signature = (
            tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([None, self.size, self.size], tf.uint8),
        )
        chunks = tf.data.Dataset.from_generator(self._chunks, args=(start, stop), output_signature=signature)
        return chunks.unbatch()

    def _chunks(self, start, stop):
        start, stop = int(start), int(stop)
        blocks = store.iter_rows(self.path, self.cache_rows[start:stop], chunk=CHUNK_ROWS)
        for i, block in enumerate(blocks):
            first = start + i * CHUNK_ROWS
            yield self.rows[first : first + len(block)], block

    def gray01(self, pixels: tf.Tensor) -> tf.Tensor:
        # The same uint8 -> [0,1] conversion as decoding an 8-bit PNG.
        return tf.image.convert_image_dtype(pixels[..., None], tf.float32)


@dataclass(frozen=True)
class PixelInput:
    """A pixel cache file read in place of the PNGs; row i of the extraction is the image `names[i]`."""

    path: Path
    name: str  # the pixel cache's backbone name
    size: int
    fingerprint: str
    cache_rows: np.ndarray  # per extraction row: its row in the file, -1 when the file lacks the name
    status: np.ndarray  # per extraction row: the stored status (MISSING where absent)
    errors: np.ndarray  # per extraction row: the stored reason

    @classmethod
    def open(cls, path: Path, *, names: Sequence[str], index=None) -> "PixelInput":
        """Check that `path` is a finished one-view pixel cache of `index`'s data set (when given), its
        rows those it wrote, and line its rows up with `names`."""
        path = Path(path)
        store.refuse_folder(path)
        if not path.is_file():
            raise InputError(
                f"{path}: no pixel cache; make it first "
                '(a backbone with source = "pixels" and image_size at least that of the backbones it feeds)'
            ).fixed_by(Fix("extract", {"backbone": path.stem}))
        attrs = store.read_attrs(path)
        if attrs["kind"] != "pixels" or attrs["views"] != 1:
            raise InputError(
                f"{path} holds kind={attrs['kind']!r} with views={attrs['views']}; --from-pixels needs a "
                'one-view cache of a source = "pixels" backbone'
            )
        stored_names, stored_status, stored_errors = store.read_status(path)
        if index is not None:
            check_origin(path, recorded=attrs.get("dataset"), names=stored_names, index=index)
        store.check_rows(path)  # iter_rows reads a few rows at a time, so it cannot check them itself
        rows = positions(names, among=stored_names)
        found = rows >= 0
        status = np.full(len(rows), Status.MISSING, dtype=np.int8)
        errors = np.full(len(rows), f"not in pixel cache {path}", dtype=object)
        status[found], errors[found] = stored_status[rows[found]], stored_errors[rows[found]]
        return cls(
            path=path,
            name=str(attrs["backbone"]),
            size=int(attrs.get("image_size") or _stored_size(path, rows[found])),
            fingerprint=str(attrs.get("fingerprint", "")),
            cache_rows=rows,
            status=status,
            errors=errors,
        )

    def __len__(self) -> int:
        return len(self.cache_rows)

    def describe(self) -> dict:
        return {
            "source": "pixels",
            "cache": self.name,
            "image_size": self.size,
            "fingerprint": self.fingerprint,
        }

    def check_backbones(self, backbones: Sequence) -> None:
        """Refuse to upscale (detail the cache lacks would be invented) or to overwrite the cache itself."""
        for backbone in backbones:
            if backbone.name == self.name:
                raise InputError(
                    f"{self.path}: the pixel cache read cannot also be written; drop {self.name}"
                )
            if backbone.spec.size > self.size:
                raise InputError(
                    f"{self.path} stores {self.size} px images, smaller than the {backbone.spec.size} px "
                    f"backbone {backbone.name!r} needs; make a pixel cache of at least {backbone.spec.size} px"
                )

    def check(self, rows: Sequence[int]) -> dict[int, tuple[Status, str]]:
        """A row failed here when it failed (or is absent) in the pixel cache, with the stored reason."""
        return {int(row): (Status(self.status[row]), str(self.errors[row])) for row in rows}

    def source(self, rows: np.ndarray) -> StoredPixels:
        return StoredPixels(path=self.path, cache_rows=self.cache_rows[rows], rows=rows, size=self.size)

    def explain(self, row: int) -> tuple[Status, str]:
        # Stored pixels are never dropped by the pipeline (a read error stops the run), so this is a guard.
        return Status.UNDECODABLE, f"{self.path}: the stored pixels of row {row} were not read"


def _stored_size(path: Path, rows: np.ndarray) -> int:
    """The image side of a pixel cache without an `image_size` attribute (a file of one's own)."""
    first = next(store.iter_rows(path, rows[:1], chunk=1), None)
    if first is None:
        raise InputError(f"{path}: the pixel cache holds none of the images to extract")
    return int(first.shape[-1])
