"""The pointing game: does a heatmap's peak fall inside the box drawn around the finding?

Boxes come in the shape of NIH's BBox_List_2017.csv (Image Index, Finding Label, x, y, w, h in the image
file's pixels: 984 boxes of 8 findings on 1024 x 1024 films); make-sample writes its own in that shape.
A hit is a peak inside any box of that finding on that image. Chance is what a point dropped uniformly
at random would score: the share of the image its boxes cover.
"""

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr14.errors import InputError
from dataset.image_loader import ImageError, read_gray01
from inference.heatmap import explain, heatmap_method, peak

# BBox_List_2017.csv spells one finding differently from Data_Entry_2017.csv.
SPELLINGS = {"Infiltrate": "Infiltration"}
FAILURES_SHOWN = 5


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float

    def holds(self, x: float, y: float) -> bool:
        return self.x <= x < self.x + self.w and self.y <= y < self.y + self.h


def read_boxes(path: Path, *, labels: Sequence[str]) -> dict[str, dict[str, list[Box]]]:
    """{image name: {label: [boxes]}} from a BBox_List_2017.csv-shaped file; bad rows name their line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such box file (NIH's BBox_List_2017.csv, or the sample's)")
    boxes: dict[str, dict[str, list[Box]]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        if [h.strip() for h in header[:2]] != ["Image Index", "Finding Label"]:
            raise InputError(
                f"{path}: line 1: expected the header 'Image Index,Finding Label,Bbox [x,y,w,h],,,' "
                f"of BBox_List_2017.csv, got {','.join(header)[:80]!r}"
            )
        for line, row in enumerate(rows, start=2):
            if not any(cell.strip() for cell in row):
                continue
            name, label, box = _parse_row(row, labels=labels, where=f"{path}: line {line}")
            boxes.setdefault(name, {}).setdefault(label, []).append(box)
    if not boxes:
        raise InputError(f"{path}: holds no boxes after the header")
    return boxes


def _parse_row(row: list[str], *, labels: Sequence[str], where: str) -> tuple[str, str, Box]:
    cells = [cell.strip() for cell in row]
    if len(cells) < 6 or not cells[0]:
        raise InputError(f"{where}: expected image name, finding, x, y, w, h; got {','.join(row)!r}")
    label = SPELLINGS.get(cells[1], cells[1])
    if label not in labels:
        raise InputError(f"{where}: finding {cells[1]!r} is not one of the labels: {', '.join(labels)}")
    try:
        x, y, w, h = (float(v) for v in cells[2:6])
    except ValueError:
        raise InputError(f"{where}: box {cells[2:6]} is not four numbers x, y, w, h") from None
    if not (w > 0 and h > 0):
        raise InputError(f"{where}: box width and height must be positive, got w={w}, h={h}")
    return cells[0], label, Box(x, y, w, h)


def pointing_game(
    run,
    *,
    boxes: dict,
    paths: dict[str, str],
    method: str = "auto",
    seed: int = 0,
    max_pixels: int | None = None,
) -> dict:
    """Hit rate of the run's heatmap peaks against `boxes` ({name: {label: [Box]}}), per label and overall.

    `paths` maps image names to files ("" or absent: not found). Images that cannot be read are counted
    and skipped; chance is the mean share of the image covered by the finding's boxes.
    """
    method = heatmap_method(run, method)
    if not boxes:
        raise InputError("no boxes to score: none of the box file's images is in this split")
    tally = {label: {"pairs": 0, "hits": 0, "chance": 0.0} for label in run.labels}
    failed = []
    for name in sorted(boxes):
        try:
            gray01 = read_gray01(paths.get(name, ""), max_pixels=max_pixels)
        except ImageError as err:
            failed.append((name, err.reason))
            continue
        found = boxes[name]
        explanation = explain(run, gray01, labels=sorted(found), method=method, seed=seed)
        for label, heatmap in zip(explanation.labels, explanation.maps, strict=True):
            x, y = peak(heatmap)
            counts = tally[label]
            counts["pairs"] += 1
            counts["hits"] += any(box.holds(x, y) for box in found[label])
            counts["chance"] += covered_share(found[label], height=heatmap.shape[0], width=heatmap.shape[1])
    if len(failed) == len(boxes):
        raise InputError(f"none of the {len(boxes)} boxed images could be read; first: {failed[0][1]}")
    return _rates(tally, failed=failed, method=method)


def covered_share(boxes: Sequence[Box], *, height: int, width: int) -> float:
    """Share of an image's pixel centres inside the union of `boxes`."""
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    inside = np.zeros((height, width), dtype=bool)
    for b in boxes:
        inside |= ((ys >= b.y) & (ys < b.y + b.h))[:, None] & ((xs >= b.x) & (xs < b.x + b.w))[None, :]
    return float(inside.mean())


def _rates(tally: dict, *, failed: list, method: str) -> dict:
    labels = {
        label: {
            "pairs": c["pairs"],
            "hits": c["hits"],
            "rate": c["hits"] / c["pairs"],
            "chance": c["chance"] / c["pairs"],
        }
        for label, c in tally.items()
        if c["pairs"]
    }
    pairs = sum(c["pairs"] for c in labels.values())
    return {
        "method": method,
        "labels": labels,
        "pairs": pairs,
        "hits": sum(c["hits"] for c in labels.values()),
        "rate": sum(c["hits"] for c in labels.values()) / pairs,
        "chance": sum(c["chance"] * c["pairs"] for c in labels.values()) / pairs,
        "unreadable": len(failed),
        "failures": failed[:FAILURES_SHOWN],
    }


def format_pointing_game(result: dict) -> str:
    """Per label: boxed positives, hits, hit rate and chance; then overall and what could not be read."""
    lines = [f"{'label':<20} {'pairs':>5} {'hits':>5} {'rate':>6} {'chance':>6}"]
    for label, c in result["labels"].items():
        lines.append(f"{label:<20} {c['pairs']:>5} {c['hits']:>5} {c['rate']:>6.3f} {c['chance']:>6.3f}")
    lines.append(
        f"{'all':<20} {result['pairs']:>5} {result['hits']:>5} {result['rate']:>6.3f} {result['chance']:>6.3f}"
    )
    where = f" on the {result['split']} split's {result['images']} boxed images" if "split" in result else ""
    lines.append(
        f"pointing game{where} ({result['method']} peak inside the finding's box); chance = share of the "
        f"image the boxes cover; {result['unreadable']} boxed image(s) could not be read"
    )
    lines += [f"  unreadable: {name}: {reason}" for name, reason in result["failures"]]
    return "\n".join(lines)
