"""The caveats every output carries where they apply: a synthetic data set (not comparable with published
results), backbones with random weights (not a medical model), features from backbones that saw
ChestX-ray14 in pre-training (optimistic beside published numbers). Both stages use it: make-sample marks
its folder, every later output reads the mark."""

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

# make-sample writes this file into the data folder it makes; a folder holding it is synthetic.
SYNTHETIC_MARKER = "SYNTHETIC.txt"
# Folders made by make-sample before the marker existed hold only this one.
SAMPLE_README = "README_SAMPLE.txt"
SYNTHETIC_NOTICE = "synthetic sample — not comparable with published results"
# How a `pretrained_on` entry names this data set (compared without case, spaces or punctuation):
# ChestX-ray8 is its first release, the same images.
CHESTXRAY14_NAMES = ("chestxray14", "nihchestxray14", "cxr14", "nihcxr14", "chestxray8", "nihchestxray8")
SEEN_NOTICE = "features pre-trained on ChestX-ray14 images — test AUC optimistic beside published results"


def is_synthetic(data_dir: Path) -> bool:
    """Whether `data_dir` was made by make-sample (or is marked synthetic by hand)."""
    data_dir = Path(data_dir)
    return (data_dir / SYNTHETIC_MARKER).is_file() or (data_dir / SAMPLE_README).is_file()


def synthetic_split_source(source: str) -> str:
    """The split source of a synthetic set: never plain "official", which reads like the real benchmark."""
    shape = {"official": "official-format lists", "frozen": "frozen lists"}.get(source, f"{source} split")
    return f"synthetic sample ({shape})"


def random_weight_backbones(backbones: Mapping[str, Mapping | None]) -> list[str]:
    """Names of backbones (their settings as dicts) whose weights are random: they know nothing of images.
    None (features of one's own, made elsewhere) is not judged."""
    return [
        name
        for name, table in backbones.items()
        if table is not None
        and (
            table.get("source") == "random"
            or (table.get("source") in ("keras", "hub") and str(table.get("weights")).lower() in ("none", ""))
        )
    ]


def not_medical_warning(*, synthetic: bool, random_backbones: list[str]) -> str:
    """One line for predict and export, or "" when the run was trained on real data with real backbones."""
    reasons = []
    if synthetic:
        reasons.append("trained on a synthetic sample")
    if random_backbones:
        reasons.append(f"random-weight backbone(s) {', '.join(random_backbones)}")
    if not reasons:
        return ""
    return (
        f"not a medical model: {' and '.join(reasons)}; "
        "its outputs say nothing about a real X-ray (it only shows the commands work)"
    )


def saw_chestxray14(pretrained_on: Mapping[str, Sequence[str]]) -> list[str]:
    """Names of the backbones whose `pretrained_on` list names ChestX-ray14 (any spelling above)."""
    return [
        name
        for name, sets in pretrained_on.items()
        if any(re.sub(r"[^a-z0-9]", "", str(s).lower()) in CHESTXRAY14_NAMES for s in sets or ())
    ]


def seen_notice(backbones: Sequence[str]) -> str:
    """The pre-training notice naming `backbones`, or "" when there are none."""
    return f"{SEEN_NOTICE} ({', '.join(backbones)})" if backbones else ""


def run_notice(*, synthetic: bool, seen: Sequence[str]) -> str:
    """The one notice a run's outputs carry: synthetic data, pre-training on ChestX-ray14, both, or ""."""
    return "; ".join(n for n in (SYNTHETIC_NOTICE if synthetic else "", seen_notice(seen)) if n)


def caveat_lines(*, synthetic: bool, random_backbones: list[str]) -> list[str]:
    """The lines that head a picture of a run's outputs (a heatmap overlay): the synthetic-sample notice,
    as the other plots carry it, and a mark for random-weight backbones; none for real data and weights."""
    lines = [SYNTHETIC_NOTICE] if synthetic else []
    if random_backbones:
        lines.append(f"not a medical model: random-weight backbone(s) {', '.join(random_backbones)}")
    return lines
