"""DICOM films -> the gray [0, 1] image a PNG decodes to, for dataset.image_loader (the one image loader).

Stored values go through the modality LUT (rescale slope/intercept) and the VOI LUT or window, both
with pydicom's own functions; MONOCHROME1 (high values shown dark) is inverted. Compressed transfer
syntaxes (JPEG 2000, JPEG lossless, ...) need pylibjpeg with its openjpeg and libjpeg back ends.
"""

import io
import warnings
import zlib
from collections.abc import MutableSequence

import numpy as np

DICOM_MAGIC = b"DICM"
MAGIC_OFFSET = 128  # a DICOM file starts with a 128-byte preamble, then "DICM"
MAGIC_END = MAGIC_OFFSET + len(DICOM_MAGIC)
GRAY = ("MONOCHROME1", "MONOCHROME2")
# What a deflated film may inflate to beyond its pixels: the header, overlays, private tags.
INFLATED_HEADER_BYTES = 4 * 2**20
PLUGINS = "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg"


class DicomError(ValueError):
    """A DICOM file that is not a film this project can read; the message names the file and why."""


def is_dicom(head: bytes) -> bool:
    """Whether a file's first bytes (at least 132) carry the DICOM preamble's magic."""
    return head[MAGIC_OFFSET:MAGIC_END] == DICOM_MAGIC


def decode_dicom(data: bytes, *, source: str, max_pixels: int | None = None) -> np.ndarray:
    """A DICOM file's bytes -> (H, W, 1) float32 gray in [0, 1], bright = dense, as a PNG decodes.

    Raises DicomError, naming `source` and the reason, for files that are not single-frame grayscale
    films: multi-frame, colour, no pixel data, other bit depths, header values pydicom refuses, pixel
    data that cannot be decoded, more than `max_pixels` pixels, or a film that decodes blank.
    """
    ds = _read(io.BytesIO(data), source=source, max_pixels=max_pixels)
    _check_film(ds, source=source, max_pixels=max_pixels)
    image = _displayed(ds, _pixels(ds, source=source), source=source)
    # A slope of 0 or a window that is not a number passes pydicom and gives one value everywhere:
    # a black film stored as a good one. No real film is one value.
    if not np.isfinite(image).all() or image.min() == image.max():
        raise DicomError(
            f"{source}: DICOM decodes to a blank film (every pixel the same value); its rescale "
            "(RescaleSlope, RescaleIntercept) or window (WindowCenter, WindowWidth) is wrong"
        )
    return image.astype(np.float32)[..., None]


def _displayed(ds, stored: np.ndarray, *, source: str) -> np.ndarray:
    """Stored values -> [0, 1] through the modality LUT and the VOI LUT or window, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = apply_modality_lut(stored, ds)
        voi = _voi_kind(ds)
        shown = apply_voi_lut(values, ds) if voi else values
        low, high = _display_range(ds, voi=voi)
    except Exception as err:  # noqa: BLE001 - pydicom refuses bad LUT and window values with many types
        raise DicomError(f"{source}: DICOM header values cannot be applied: {_first_line(err)}") from None
    with np.errstate(invalid="ignore"):
        image = np.clip((np.asarray(shown, np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # 0 is white: turn it round like every other film
        image = 1.0 - image
    return image


def header_problem(path, *, max_pixels: int | None = None) -> str:
    """Why the DICOM at `path` is no film to decode, by its header alone ("" when it is one): what
    decode_dicom refuses, and more than `max_pixels` pixels. Its pixel data is not read (nor inflated
    past what `max_pixels` allows, for the deflated transfer syntax)."""
    try:
        with open(path, "rb") as f:
            ds = _read(f, source=str(path), defer_size=1024, max_pixels=max_pixels)
        _check_film(ds, source=str(path), max_pixels=max_pixels)
    except DicomError as err:
        return str(err)
    return ""


def _read(fp, *, source: str, defer_size: int | None = None, max_pixels: int | None = None):
    import pydicom  # only DICOM files need it

    _refuse_deflated_bomb(fp, source=source, max_pixels=max_pixels)
    try:
        # pydicom warns where it repairs a header as it reads (an explicit VR where implicit was declared):
        # what it cannot repair raises, and a film it reads is checked below, so the warnings say nothing
        # the user must act on, once per file.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return pydicom.dcmread(fp, defer_size=defer_size)
    except Exception as err:  # pydicom raises many types for a damaged header; each is "cannot read"
        raise DicomError(f"{source}: DICOM header cannot be read: {_first_line(err)}") from None


def _refuse_deflated_bomb(fp, *, source: str, max_pixels: int | None) -> None:
    """Refuse a deflated-syntax file that inflates past what `max_pixels` 16-bit pixels and a header take,
    inflating no more than that: pydicom inflates the whole data set before reading a single element,
    and 1 MB of zeros deflated is 1 GB inflated."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble

    start = fp.tell()
    try:
        with warnings.catch_warnings():  # repairs pydicom makes as it reads, as in _read
            warnings.simplefilter("ignore", UserWarning)
            read_preamble(fp, False)
            syntax = _read_file_meta_info(fp).get("TransferSyntaxUID")
    except Exception:  # noqa: BLE001 - a damaged header is refused, with its reason, by dcmread next
        syntax = None
    try:
        if max_pixels is None or syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
            return
        limit = 2 * max_pixels + INFLATED_HEADER_BYTES
        try:
            inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(fp.read(), limit + 1)
        except zlib.error as err:
            raise DicomError(f"{source}: deflated DICOM cannot be inflated: {err}") from None
        if len(inflated) > limit:
            raise DicomError(
                f"{source}: deflated DICOM inflates to more than {limit:,} bytes, more than "
                f"{max_pixels:,} pixels (extract.max_pixels) can take; not decoded"
            )
    finally:
        fp.seek(start)


def _check_film(ds, *, source: str, max_pixels: int | None = None) -> None:
    """Refuse, with the reason, what is not one grayscale 8-16-bit frame of at most `max_pixels` pixels,
    or has header values that cannot make a picture."""

    def fail(reason: str):
        modality = f" ({ds.get('Modality')})" if ds.get("Modality") else ""
        raise DicomError(f"{source}: DICOM{modality} {reason}")

    try:
        # pydicom converts values as they are read, warning for those it cannot (IS 'ab', DS 'nan'):
        # each is refused here with its reason, once, so the warning would only repeat it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _check_layout(ds, fail=fail)
            _check_values(ds, fail=fail)
            width, height = int(ds.Columns), int(ds.Rows)
    except DicomError:
        raise
    except Exception as err:  # noqa: BLE001 - an element pydicom cannot even convert (IS 'ab', ...)
        fail(f"has a header value that cannot be read: {_first_line(err)}")
    if max_pixels is not None and width * height > max_pixels:
        raise DicomError(
            f"{source}: {width}x{height} pixels is more than the limit of {max_pixels:,} "
            "(extract.max_pixels); not decoded"
        )


def _number(ds, key: str, default, *, fail) -> float:
    """An element's value as a number (its first, for several), or the reason it is none."""
    raw = ds.get(key, default)
    if isinstance(raw, MutableSequence):  # a multi-valued element (several windows): pydicom uses the first
        raw = raw[0] if raw else default
    try:
        value = float(raw if raw not in (None, "") else default)
    except (TypeError, ValueError):
        fail(f"has {key} = {raw!r}, not a number")
    return value


def _check_layout(ds, *, fail) -> None:
    """Pixel data, its size, one frame, one gray channel, 8 or 16 bits."""
    if "PixelData" not in ds:
        fail("holds no image (no Pixel Data: not a film, or a file cut short); only X-ray films can be read")
    if "Rows" not in ds or "Columns" not in ds:
        fail("has pixel data but no Rows and Columns; the file is damaged")
    frames = _number(ds, "NumberOfFrames", 1, fail=fail)
    if frames > 1:
        fail(f"is multi-frame ({frames:g} frames); only single-frame films can be read")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if _number(ds, "SamplesPerPixel", 1, fail=fail) != 1 or photometric not in GRAY:
        fail(
            f"is a colour image ({photometric or 'no PhotometricInterpretation'}); only grayscale films (MONOCHROME1/2) can be read"
        )
    bits = int(_number(ds, "BitsAllocated", 0, fail=fail))
    if bits not in (8, 16):
        fail(f"has {bits}-bit pixel data; only 8- to 16-bit films can be read")
    stored = _number(ds, "BitsStored", bits, fail=fail)
    if not 1 <= stored <= bits:
        fail(f"has BitsStored = {stored:g} with {bits}-bit pixels; BitsStored must be 1 to {bits}")


def _check_values(ds, *, fail) -> None:
    """The rescale, window and VOI LUT values that the picture is computed with."""
    slope = _number(ds, "RescaleSlope", 1, fail=fail)
    intercept = _number(ds, "RescaleIntercept", 0, fail=fail)
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        fail(
            f"has RescaleSlope = {slope:g}, RescaleIntercept = {intercept:g}; the slope must be a non-zero number"
        )
    voi = _voi_kind(ds)
    if voi == "lut":
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        if not 1 <= bits <= 16:
            fail(f"has a {bits}-bit VOI LUT; a VOI LUT holds 1- to 16-bit values")
    if voi == "window":
        center = _number(ds, "WindowCenter", 0, fail=fail)
        width = _number(ds, "WindowWidth", 1, fail=fail)
        if not (np.isfinite(center) and np.isfinite(width)) or width < 1:
            fail(
                f"has WindowCenter = {center:g}, WindowWidth = {width:g}; the width must be a number of at least 1"
            )


def _pixels(ds, *, source: str) -> np.ndarray:
    """The stored values; compressed syntaxes need the pylibjpeg plugins, and the message says so."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        return ds.pixel_array
    except Exception as err:  # missing plugin, truncated or corrupt data: all mean "cannot decode"
        hint = f"; for compressed DICOMs: {PLUGINS}" if syntax is not None and syntax.is_compressed else ""
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise DicomError(
            f"{source}: DICOM pixel data ({name}) cannot be decoded: {_first_line(err)}{hint}"
        ) from None


def _voi_kind(ds) -> str:
    """Which VOI transform apply_voi_lut will use: "lut" (preferred when valid), "window" or ""."""
    lut = ds.get("VOILUTSequence")
    if lut and None not in (lut[0].get("LUTDescriptor"), lut[0].get("LUTData")):
        return "lut"
    return "window" if None not in (ds.get("WindowCenter"), ds.get("WindowWidth")) else ""


def _display_range(ds, *, voi: str) -> tuple[float, float]:
    """The values that mean black and white: the VOI's output range, else the stored bits' whole range
    through the modality LUT (as a PNG's 0..255 or 0..65535), never the film's own min and max."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if voi == "lut":
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if voi == "window":
        # The window's output range depends on the stored bits and the rescale; values far below and
        # above the window, pushed through pydicom's own windowing, come out as exactly its two ends.
        center, width = _first(ds["WindowCenter"]), abs(_first(ds["WindowWidth"]))
        ends = apply_voi_lut(np.array([center - 50 * width - 1, center + 50 * width + 1]), ds)
    else:
        bits, signed = int(ds.BitsStored), int(ds.get("PixelRepresentation", 0)) == 1
        stored = [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1]
        ends = apply_modality_lut(np.array(stored, dtype=np.int64), ds)
    return float(np.min(ends)), float(np.max(ends))


def _first(element) -> float:
    """The first of a DS element's values (a film may carry several windows; pydicom uses the first)."""
    return float(element.value[0] if element.VM > 1 else element.value)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
