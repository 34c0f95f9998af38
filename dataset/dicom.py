"""DICOM films -> the gray [0, 1] image a PNG decodes to, for dataset.image_loader (the one image loader).

Stored values go through the modality LUT (rescale slope/intercept) and the VOI LUT or window, both
with pydicom's own functions; MONOCHROME1 (high values shown dark) is inverted. Compressed transfer
syntaxes (JPEG 2000, JPEG lossless, ...) need pylibjpeg with its openjpeg and libjpeg back ends.
"""

import io
import warnings

import numpy as np

DICOM_MAGIC = b"DICM"
MAGIC_OFFSET = 128  # a DICOM file starts with a 128-byte preamble, then "DICM"
MAGIC_END = MAGIC_OFFSET + len(DICOM_MAGIC)
GRAY = ("MONOCHROME1", "MONOCHROME2")
PLUGINS = "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg"


class DicomError(ValueError):
    """A DICOM file that is not a film this project can read; the message names the file and why."""


def is_dicom(head: bytes) -> bool:
    """Whether a file's first bytes (at least 132) carry the DICOM preamble's magic."""
    return head[MAGIC_OFFSET:MAGIC_END] == DICOM_MAGIC


def decode_dicom(data: bytes, *, source: str) -> np.ndarray:
    """A DICOM file's bytes -> (H, W, 1) float32 gray in [0, 1], bright = dense, as a PNG decodes.

    Raises DicomError, naming `source` and the reason, for files that are not single-frame grayscale
    films: multi-frame, colour, no pixel data, other bit depths, or pixel data that cannot be decoded.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _read(io.BytesIO(data), source=source)
    _check_film(ds, source=source)
    values = apply_modality_lut(_pixels(ds, source=source), ds)
    voi = _voi_kind(ds)
    shown = apply_voi_lut(values, ds) if voi else values
    low, high = _display_range(ds, voi=voi)
    image = np.clip((np.asarray(shown, np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # 0 is white: turn it round like every other film
        image = 1.0 - image
    return image.astype(np.float32)[..., None]


def header_problem(path, *, max_pixels: int | None = None) -> str:
    """Why the DICOM at `path` is no film to decode, by its header alone ("" when it is one): what
    decode_dicom refuses, and more than `max_pixels` pixels. Its pixel data is not read."""
    try:
        ds = _read(path, source=str(path), defer_size=1024)
        _check_film(ds, source=str(path))
    except DicomError as err:
        return str(err)
    width, height = int(ds.Columns), int(ds.Rows)
    if max_pixels is not None and width * height > max_pixels:
        return f"{path}: {width}x{height} pixels is more than the limit of {max_pixels:,} (extract.max_pixels); not decoded"
    return ""


def _read(file, *, source: str, defer_size: int | None = None):
    import pydicom  # only DICOM files need it

    try:
        # pydicom warns where it repairs a header as it reads (an explicit VR where implicit was declared):
        # what it cannot repair raises, and a film it reads is checked below, so the warnings say nothing
        # the user must act on, once per file.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return pydicom.dcmread(file, defer_size=defer_size)
    except Exception as err:  # pydicom raises many types for a damaged header; each is "cannot read"
        raise DicomError(f"{source}: DICOM header cannot be read: {_first_line(err)}") from None


def _check_film(ds, *, source: str) -> None:
    """Refuse, with the reason, what is not one grayscale 8-16-bit frame."""

    def fail(reason: str):
        modality = f" ({ds.Modality})" if ds.get("Modality") else ""
        raise DicomError(f"{source}: DICOM{modality} {reason}")

    if "PixelData" not in ds:
        fail("holds no image (no Pixel Data: not a film, or a file cut short); only X-ray films can be read")
    if "Rows" not in ds or "Columns" not in ds:
        fail("has pixel data but no Rows and Columns; the file is damaged")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        fail(f"is multi-frame ({frames} frames); only single-frame films can be read")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in GRAY:
        fail(
            f"is a colour image ({photometric or 'no PhotometricInterpretation'}); only grayscale films (MONOCHROME1/2) can be read"
        )
    bits = int(ds.get("BitsAllocated", 0))
    if bits not in (8, 16) or not 1 <= int(ds.get("BitsStored", bits)) <= bits:
        fail(f"has {bits}-bit pixel data; only 8- to 16-bit films can be read")


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
