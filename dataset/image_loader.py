"""The one image pipeline: PNG or DICOM file -> gray [0,1] -> resize -> uint8 pixels | backbone normalisation.

The host decodes and resizes (to_pixels); the backbone casts and normalises on its device (normalize,
inside extract.backbones' tf.function), so a batch crosses to the device as uint8: 4x less than float32
with one channel instead of three. Extraction, prediction, export and the benchmark all go through here,
so an image is never preprocessed one way for training and another way for prediction.
"""

import errno
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cache.status import Status
from cxr14.errors import InputError, check_choice
from dataset import dicom
from dataset.settings import NORMALIZATIONS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The signature, then the IHDR chunk: 4 length + "IHDR" + 4 width + 4 height (big-endian) + ...
_HEAD_BYTES = 24
# IEND is the last chunk (4 length + 4 type + 4 CRC bytes); only when the last bytes lack it are the
# chunks walked, which finds an IEND followed by extra bytes (decoders ignore them).
_TAIL_BYTES = 64
_BIT_DEPTH_OFFSET = 24  # 8 signature + 4 length + 4 "IHDR" + 4 width + 4 height


class ImageError(InputError):
    """An image that cannot be used; `status` is a cache.status.Status, `reason` says why."""

    def __init__(self, status: Status, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ImageSpec:
    """What a backbone wants: square size, normalisation, keras family (for "keras"), channels."""

    size: int
    normalization: str
    keras_family: str = ""
    channels: int = 3

    def __post_init__(self):
        check_choice(self.normalization, NORMALIZATIONS, what="normalization")
        if self.normalization == "keras":
            keras_preprocess(self.keras_family)  # fail now, not inside a tf.data worker
        if self.channels not in (1, 3):
            raise InputError(f"channels must be 1 or 3, got {self.channels}")
        if self.size < 1:
            raise InputError(f"image size must be positive, got {self.size}")

    def as_dict(self) -> dict:
        return {
            "size": self.size,
            "normalization": self.normalization,
            "keras_family": self.keras_family,
            "channels": self.channels,
            "resize": "area (down) / bilinear (up), square, rounded to uint8",
        }


def keras_preprocess(family: str):
    """`keras.applications.<family>.preprocess_input`, or an InputError listing the families."""
    module = getattr(keras.applications, family, None) if family else None
    if module is None or not hasattr(module, "preprocess_input"):
        valid = sorted(
            name
            for name in dir(keras.applications)
            if hasattr(getattr(keras.applications, name), "preprocess_input")
        )
        raise InputError(
            f"keras_family {family!r} has no keras.applications preprocess_input; valid: {', '.join(valid)}"
        )
    return module.preprocess_input


def decode(png: tf.Tensor) -> tf.Tensor:
    """PNG bytes -> (H, W, 1) float32 in [0, 1]; 8- or 16-bit, gray, gray+alpha, RGB(A) or palette."""
    # Decoding 8-bit files as uint16 would be exact too, but ~15% slower; only 16-bit files need it.
    depth = tf.strings.substr(png, _BIT_DEPTH_OFFSET, 1)
    return tf.cond(
        tf.equal(depth, b"\x10"),
        lambda: tf.image.convert_image_dtype(tf.io.decode_png(png, channels=1, dtype=tf.uint16), tf.float32),
        lambda: tf.image.convert_image_dtype(tf.io.decode_png(png, channels=1, dtype=tf.uint8), tf.float32),
    )


def decode_file(path: tf.Tensor) -> tf.Tensor:
    """In-graph: a file path -> (H, W, 1) float32 in [0, 1]; a DICOM (by its magic) through pydicom."""
    data = tf.io.read_file(path)
    magic = tf.cond(
        tf.strings.length(data) >= dicom.MAGIC_END,
        lambda: tf.strings.substr(data, dicom.MAGIC_OFFSET, len(dicom.DICOM_MAGIC)),
        lambda: tf.constant(b""),
    )
    return tf.cond(
        tf.equal(magic, dicom.DICOM_MAGIC), lambda: _decode_dicom_op(data, path), lambda: decode(data)
    )


def _decode_dicom_op(data: tf.Tensor, path: tf.Tensor) -> tf.Tensor:
    """pydicom in a py_function; a film it refuses comes back empty and fails here, dropping the element."""

    @tf.autograph.experimental.do_not_convert
    def decode_numpy(data, path):
        try:
            return dicom.decode_dicom(data.numpy(), source=path.numpy().decode())
        except dicom.DicomError:  # decode_error gives the reason; a raise here would log a traceback
            return np.zeros((0, 0, 1), np.float32)

    image = tf.py_function(decode_numpy, [data, path], tf.float32)
    image.set_shape([None, None, 1])
    with tf.control_dependencies([tf.debugging.assert_positive(tf.size(image), message="DICOM not decoded")]):
        return tf.identity(image)


def resize(image01: tf.Tensor, size: int) -> tf.Tensor:
    """Square resize; `area` when shrinking (antialiased and ~2x faster than antialiased bilinear)."""
    shape = tf.shape(image01)
    shrinking = tf.logical_and(shape[0] >= size, shape[1] >= size)
    return tf.cond(
        shrinking,
        lambda: tf.image.resize(image01, (size, size), method="area"),
        lambda: tf.image.resize(image01, (size, size), method="bilinear", antialias=True),
    )


def quantize(image01: tf.Tensor) -> tf.Tensor:
    """[0,1] float -> uint8 0..255, rounded to nearest."""
    return tf.cast(tf.round(tf.clip_by_value(image01 * 255.0, 0.0, 255.0)), tf.uint8)


def to_pixels(image01: tf.Tensor, size: int) -> tf.Tensor:
    """Decoded gray [0,1] (H, W, 1) -> (size, size, 1) uint8: what a backbone takes, and what a pixel cache stores."""
    return quantize(resize(image01, size))


def normalize(pixels: tf.Tensor, spec: ImageSpec) -> tf.Tensor:
    """uint8 (..., s, s, 1) -> float32 (..., s, s, spec.channels) in the backbone's input range."""
    image = tf.cast(pixels, tf.float32)  # 0..255
    if spec.normalization == "standardize":
        image = tf.image.per_image_standardization(image / 255.0)
    elif spec.normalization == "unit":
        image = image / 255.0
    if spec.channels == 3:
        image = tf.repeat(image, 3, axis=-1)
    if spec.normalization == "keras":  # "bytes" and "keras" both start from 0..255
        image = tf.cast(keras_preprocess(spec.keras_family)(image), tf.float32)
    return image


def check_file(path, *, max_pixels: int | None = None) -> tuple[Status, str]:
    """Cheap file check without decoding: MISSING, EMPTY, UNDECODABLE (unreadable, neither PNG nor DICOM,
    a DICOM header that is no single grayscale film, or more than `max_pixels` pixels by its header),
    TRUNCATED or OK."""
    if not str(path):
        return Status.MISSING, "no image file of this name under the data folder"
    path = Path(path)
    try:
        missing = _not_a_file(path)
        if missing:
            return Status.MISSING, missing
        size, head, tail, has_iend = _read_ends(path)
    except OSError as err:  # permission denied, an I/O error: this file only, the rest still run
        return Status.UNDECODABLE, f"{path}: cannot be read ({err.strerror or type(err).__name__})"
    if size == 0:
        return Status.EMPTY, f"{path}: image file is empty (0 bytes)"
    if dicom.is_dicom(head):
        problem = dicom.header_problem(path, max_pixels=max_pixels)
        return (Status.UNDECODABLE, problem) if problem else (Status.OK, "")
    if head[: len(PNG_SIGNATURE)] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        # The file's own bytes are not echoed: they may be anything, control characters included.
        return (
            Status.UNDECODABLE,
            f"{path}: not a PNG file (no PNG signature and IHDR header at its start) nor a DICOM "
            "(no DICM preamble)",
        )
    width, height = struct.unpack(">II", head[16:24])
    if max_pixels is not None and width * height > max_pixels:
        return (
            Status.UNDECODABLE,
            f"{path}: {width}x{height} pixels is more than the limit of {max_pixels:,} "
            "(extract.max_pixels); not decoded",
        )
    if not has_iend:
        return (
            Status.TRUNCATED,
            f"{path}: PNG ends after {size} bytes without its IEND chunk (truncated copy?)",
        )
    return Status.OK, ""


def _not_a_file(path: Path) -> str:
    """Why `path` is not an image file to read ("" when it is one)."""
    if path.is_file():
        return ""
    if path.is_symlink():
        return _link_problem(path)
    if path.is_dir():
        return f"{path}: a folder, not an image file"
    if path.exists():
        return f"{path}: not a regular file"
    return f"{path}: image file not found"


def _link_problem(path: Path) -> str:
    """Why a symbolic link is no image file: a loop, a broken link, or a link to a device, pipe or folder."""
    target = os.readlink(path)
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{path}: symbolic-link loop (to {target}); replace it with the image file or remove it"
        return f"{path}: broken symbolic link (to {target}); image file not found"
    return f"{path}: a symbolic link to {target}, which is not a regular file (a device, a pipe or a folder)"


def _read_ends(path: Path) -> tuple[int, bytes, bytes, bool]:
    """(size, first bytes, last bytes, whether the PNG chunks reach an IEND chunk)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(max(_HEAD_BYTES, dicom.MAGIC_END))
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
        # A DICOM has no chunks to walk: pydicom reads its header, decoding tells whether it is whole.
        has_iend = dicom.is_dicom(head) or b"IEND" in tail or _walk_to_iend(f, size)
    return size, head, tail, has_iend


def _walk_to_iend(f, size: int) -> bool:
    """Whether the chunks, followed by their lengths from the signature on, reach an IEND chunk."""
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= size:
        f.seek(offset)
        length, kind = struct.unpack(">I4s", f.read(8))
        if kind == b"IEND":
            return True
        offset += 12 + length  # length, type, data, CRC
    return False


def decode_error(path) -> str:
    """Why this file cannot be decoded ("" if it can): the reason recorded for a dropped image."""
    try:
        read_gray01(path)
    except ImageError as err:
        return err.reason
    return ""


def _op_message(err: tf.errors.OpError) -> str:
    """The useful part of a TF op error ("Invalid PNG data, ..."), without graph-node decoration."""
    text = (err.message or type(err).__name__).strip().splitlines()[0]
    text = re.sub(r"\{\{[^}]*\}\}", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text).strip() or type(err).__name__


def read_gray01(path, *, max_pixels: int | None = None) -> np.ndarray:
    """One PNG or DICOM file, eagerly -> (H, W, 1) float32 gray in [0, 1]; ImageError says why not,
    and a file whose header says it has more than `max_pixels` pixels is refused, not decoded."""
    status, reason = check_file(path, max_pixels=max_pixels)
    if status != Status.OK:
        raise ImageError(status, reason)
    data = Path(path).read_bytes()
    if dicom.is_dicom(data[: dicom.MAGIC_END]):
        try:
            return dicom.decode_dicom(data, source=str(path), max_pixels=max_pixels)
        except dicom.DicomError as err:
            raise ImageError(Status.UNDECODABLE, str(err)) from None
    try:
        return decode(tf.constant(data)).numpy()
    except tf.errors.OpError as err:
        raise ImageError(Status.UNDECODABLE, f"{path}: PNG cannot be decoded: {_op_message(err)}") from None


def load_image(path, spec: ImageSpec, *, max_pixels: int | None = None) -> np.ndarray:
    """One image, eagerly, through the same steps as make_dataset: (s, s, 1) uint8 for `backbone.fn`;
    refused, not decoded, when its header says it has more than `max_pixels` pixels."""
    return to_pixels(tf.constant(read_gray01(path, max_pixels=max_pixels)), spec.size).numpy()


def augment(image: tf.Tensor, *, seed: tf.Tensor) -> tf.Tensor:
    """Seeded, stateless view of an (s, s, 1) [0,1] image: flip, rotation <= 10 deg + zoom crop, contrast."""
    flip_seed, geometry_seed, contrast_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image = tf.cond(
        tf.random.stateless_uniform([], seed=flip_seed) < 0.5,
        lambda: tf.image.flip_left_right(image),
        lambda: image,
    )
    image = _rotate_zoom(image, seed=geometry_seed)
    image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seed=contrast_seed)
    return tf.clip_by_value(image, 0.0, 1.0)


def _rotate_zoom(image: tf.Tensor, *, seed: tf.Tensor) -> tf.Tensor:
    """Rotate by up to +-10 degrees, zoom in up to 12% (a crop) and shift up to 4%, in one resampling."""
    angle, zoom, dx, dy = tf.unstack(
        tf.random.stateless_uniform(
            [4], seed=seed, minval=[-1.0, 1.0, -1.0, -1.0], maxval=[1.0, 1.12, 1.0, 1.0]
        )
    )
    angle = angle * (10.0 * np.pi / 180.0)
    size = tf.cast(tf.shape(image)[0], tf.float32)
    center = (size - 1.0) / 2.0
    # The transform maps output pixel (x, y) to the input pixel it samples from.
    a0, a1 = tf.cos(angle) / zoom, -tf.sin(angle) / zoom
    b0, b1 = tf.sin(angle) / zoom, tf.cos(angle) / zoom
    a2 = center - a0 * center - a1 * center + dx * 0.04 * size
    b2 = center - b0 * center - b1 * center + dy * 0.04 * size
    transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return out[0]


def cores() -> int:
    """CPU cores this process may use (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class PngFiles:
    """Images as PNG (or DICOM) files: `paths[i]` is the file of row `rows[i]` (a source for make_dataset)."""

    paths: np.ndarray  # str
    rows: np.ndarray  # int64
    may_fail = True  # a file can turn out undecodable only when decoded

    def __post_init__(self):
        object.__setattr__(self, "paths", np.asarray(self.paths, dtype=str))
        object.__setattr__(self, "rows", np.asarray(self.rows, dtype=np.int64))
        if self.paths.shape != self.rows.shape or self.paths.ndim != 1:
            raise ValueError(
                f"paths and rows must be 1-D and aligned, got {self.paths.shape}, {self.rows.shape}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def items(self, start: tf.Tensor, stop: tf.Tensor) -> tf.data.Dataset:
        """`(row, path)` for positions start..stop."""
        rows, paths = tf.constant(self.rows, tf.int64), tf.constant(self.paths.astype(str))
        return tf.data.Dataset.from_tensor_slices((rows[start:stop], paths[start:stop]))

    def gray01(self, path: tf.Tensor) -> tf.Tensor:
        return decode_file(path)


def _pixel_views(image01, row, *, size: int, views: int, seed: int) -> tf.Tensor:
    """(s, s, 1) uint8, or (K, s, s, 1): the plain image, then K-1 seeded augmentations of it."""
    image = resize(image01, size)
    if views == 1:
        return quantize(image)
    image_seed = tf.stack([tf.constant(seed, tf.int64), row])
    stack = [image] + [
        augment(image, seed=tf.random.experimental.stateless_fold_in(image_seed, v)) for v in range(1, views)
    ]
    return quantize(tf.stack(stack))


def make_dataset(
    source,
    *,
    sizes: Sequence[int],
    batch_size: int,
    shards: Sequence[tuple[int, int]],
    views: int = 1,
    seed: int = 0,
    workers: int | None = None,
) -> tf.data.Dataset:
    """Batches `(rows int64[b], pixels)`, `pixels` a tuple with one uint8 [b, s, s, 1] per size in `sizes`
    ([b, K, s, s, 1] when views > 1): each image is decoded once, then resized for every size.

    `source` (PngFiles, or extract.inputs' stored pixels) gives `(row, raw)` items by position and turns
    `raw` into gray [0,1]. `shards` are (start, stop) position ranges, read in the order given, and no
    batch mixes two shards. Images that cannot be decoded are dropped: the rows carried with each image
    say which ones arrived (see check_file, decode_error). Decoding runs on `workers` threads (default:
    every core) but the order is deterministic.
    """
    if views < 1 or batch_size < 1 or not sizes:
        raise ValueError(f"need views, batch_size >= 1 and sizes, got {views}, {batch_size}, {sizes}")
    for start, stop in shards:
        if not 0 <= start <= stop <= len(source):
            raise ValueError(f"shard ({start}, {stop}) is outside 0..{len(source)}")

    def load(row, raw):
        image01 = source.gray01(raw)
        return row, tuple(_pixel_views(image01, row, size=s, views=views, seed=seed) for s in sizes)

    def shard_batches(start, stop):
        # Per shard, so a batch never spans a shard boundary even after failed images are dropped.
        items = source.items(start, stop).map(load, num_parallel_calls=workers or cores(), deterministic=True)
        return (items.ignore_errors(log_warning=False) if source.may_fail else items).batch(batch_size)

    bounds = np.asarray(list(shards), dtype=np.int64).reshape(-1, 2)
    dataset = tf.data.Dataset.from_tensor_slices((bounds[:, 0], bounds[:, 1])).flat_map(shard_batches)
    options = tf.data.Options()
    options.deterministic = True
    # Parallelism comes from decoding one image per worker; an op spreading over cores only contends.
    options.threading.max_intra_op_parallelism = 1
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
