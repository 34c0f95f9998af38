"""Prediction on new PNG or DICOM images with a trained run (inference/trained.py), through the one image
loader, then the run's calibration and a positive/negative call per label at its operating points;
optionally with heatmaps (inference/heatmap.py)."""

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr14.errors import InputError
from cxr14.outputs import check_output_folder
from cxr14.text import count
from dataset.image_loader import ImageError, load_image
from extract.settings import ExtractConfig
from inference import heatmap
from inference.trained import TrainedRun, decided, fused_probabilities, load_run
from results.operating import call_names

FORMATS = ("table", "json")
IMAGE_SUFFIXES = (".png", ".dcm")


def list_images(inputs: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files as given, folders expanded to the PNG and DICOM (.dcm) files directly inside them (sorted);
    and what each folder held that is left out, with why."""
    paths, left_out = [], []
    for item in map(Path, inputs):
        if not item.is_dir():
            paths.append(item)  # a missing or broken file is reported in its own result, not raised
            continue
        try:
            entries = sorted(item.iterdir())
        except OSError as err:
            raise InputError(f"{item}: cannot list the folder ({err.strerror})") from None
        found = [p for p in entries if _left_out_because(p) == ""]
        if not found:
            raise InputError(
                f"{item}: folder holds no .png or .dcm files; pass PNG or DICOM files or a folder of them"
            )
        paths.extend(found)
        left_out.extend((p, _left_out_because(p)) for p in entries if p not in found)
    return paths, left_out


def _left_out_because(path: Path) -> str:
    """Why a folder's entry is not predicted ("" when it is)."""
    if path.is_dir():
        return "left out: a folder (only the files directly inside a named folder are read)"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"left out: not a {' or '.join(IMAGE_SUFFIXES)} file"
    if not path.is_file():
        return "left out: not a regular file (a broken link, a device or a pipe)"
    return ""


def predict_images(
    *,
    run_dir: Path,
    inputs: Sequence[Path],
    extract: ExtractConfig,
    heatmap_dir: Path | None = None,
    heatmap_top: int = 3,
    heatmap_method: str = "auto",
) -> list[dict]:
    """Per image: calibrated probabilities, the uncalibrated ones, a call per label, and the run's warning
    (if any); an image that cannot be read gets an error and the rest still run.

    With heatmap_dir, also the `heatmap_top` most probable findings' heatmaps per image, made by
    `heatmap_method` (inference/heatmap.py).
    """
    if heatmap_dir is not None:
        check_output_folder(heatmap_dir, what="--heatmap")
    run = load_run(run_dir)
    paths, left_out = list_images(inputs)
    if heatmap_dir is not None:
        heatmap.heatmap_method(run, heatmap_method)  # an impossible method fails before any work
    batch_size = extract.batch_size
    results = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start : start + batch_size]
        results.extend(_predict_batch(run, batch, max_pixels=extract.max_pixels))
    if heatmap_dir is not None:
        heatmap.write_heatmaps(run, results, out_dir=heatmap_dir, top=heatmap_top, method=heatmap_method)
    # Said in the output, beside the images, so that nothing in a folder is skipped without a word.
    empty = {"probabilities": None, "uncalibrated": None, "calls": None, "warning": run.warning or None}
    return results + [{"image": str(path), **empty, "error": why} for path, why in left_out]


def _predict_batch(run: TrainedRun, paths: Sequence[Path], *, max_pixels: int) -> list[dict]:
    images = {name: [] for name in run.backbones}
    errors = {}
    for i, path in enumerate(paths):
        try:
            loaded = {
                name: load_image(path, backbone.spec, max_pixels=max_pixels)
                for name, backbone in run.backbones.items()
            }
        except ImageError as err:
            errors[i] = err.reason
            continue
        for name, image in loaded.items():
            images[name].append(image)
    good = [i for i in range(len(paths)) if i not in errors]
    by_position = {}
    if good:
        raw = fused_probabilities(run, {k: np.stack(v) for k, v in images.items()})
        calibrated, calls = decided(run, raw)
        by_position = dict(
            zip(good, zip(raw.numpy(), calibrated.numpy(), calls.numpy(), strict=True), strict=True)
        )
    results = []
    for i, path in enumerate(paths):
        result = {"image": str(path), "probabilities": None, "uncalibrated": None, "calls": None}
        if i in errors:
            result["error"] = errors[i]
        else:
            raw, calibrated, calls = by_position[i]
            result["probabilities"] = dict(zip(run.labels, map(float, calibrated), strict=True))
            result["uncalibrated"] = dict(zip(run.labels, map(float, raw), strict=True))
            result["calls"] = dict(zip(run.labels, call_names(calls), strict=True))
            result["error"] = None
        results.append(result | {"warning": run.warning or None})
    return results


def format_predictions(results: list[dict], *, fmt: str = "table", csv_path: Path | None = None) -> str:
    """A table or one JSON document; with csv_path, write the CSV there and return a one-line note."""
    if csv_path is not None:
        return write_csv(results, Path(csv_path))
    if fmt not in FORMATS:
        raise InputError(f"output format {fmt!r} is not one of: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(results, indent=2)
    return format_table(results)


def _labels_of(results: list[dict]) -> list[str]:
    return next((list(r["probabilities"]) for r in results if r.get("probabilities")), [])


CALL_MARK = {"positive": "+", "negative": " ", None: "?"}


def _has_calls(results: list[dict]) -> bool:
    return any(c is not None for r in results for c in (r.get("calls") or {}).values())


def _cell(result: dict, label: str, width: int, *, calls: bool) -> str:
    """A probability and its call mark: "+" positive, " " negative, "?" a label without an operating
    point (no mark at all for a run made before operating points existed)."""
    mark = CALL_MARK[(result.get("calls") or {}).get(label)] if calls else " "
    return f"{result['probabilities'][label]:>{width - 1}.3f}{mark}"


def format_table(results: list[dict]) -> str:
    """One row per image, one column per label (calibrated probability, + for a positive call);
    unreadable images say why."""
    labels = _labels_of(results)
    image_width = max([len("image"), *(len(r["image"]) for r in results)])
    widths = [max(len(label), 6) for label in labels]
    lines = [
        "  ".join(
            [f"{'image':<{image_width}}", *(f"{lb:>{w}}" for lb, w in zip(labels, widths, strict=True))]
        )
    ]
    for r in results:
        if r.get("error"):
            lines.append(f"{r['image']:<{image_width}}  error: {r['error']}")
        else:
            cells = (_cell(r, lb, w, calls=_has_calls(results)) for lb, w in zip(labels, widths, strict=True))
            lines.append("  ".join([f"{r['image']:<{image_width}}", *cells]))
    failed = sum(1 for r in results if r.get("error"))
    lines.append(f"{count(len(results) - failed, 'image')} predicted, {failed} could not be read")
    if _has_calls(results):
        lines.append(
            "calibrated probabilities; + marks a positive call at the run's operating point (chosen on "
            "validation), ? a label without one"
        )
    return "\n".join(lines)


def write_csv(results: list[dict], path: Path) -> str:
    """image, a calibrated probability per label, a call per label (positive, negative or empty), error;
    returns a note saying where it went."""
    labels = _labels_of(results)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *labels, *(f"{lb} call" for lb in labels), "error"])
        for r in results:
            probs, calls = r.get("probabilities") or {}, r.get("calls") or {}
            writer.writerow(
                [
                    r["image"],
                    *(probs.get(lb, "") for lb in labels),
                    *(calls.get(lb) or "" for lb in labels),
                    r.get("error") or "",
                ]
            )
    failed = sum(1 for r in results if r.get("error"))
    return f"wrote {len(results)} rows to {path} ({failed} could not be read)"
