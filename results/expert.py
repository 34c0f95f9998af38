"""Google's adjudicated ChestX-ray14 labels: four findings on 4,376 images of the official validation and
test sets, each read by three radiologists (Majkowska et al., Radiology 2020). A run is scored against
them, and against the NIH labels on the very same images, through a fixed mapping of its labels.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.errors import InputError
from results.format import format_auc
from results.metrics import label_metrics

FINDINGS = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
# Expert finding -> the NIH labels whose highest probability is its score, and whose OR is its NIH label.
MAPPING = {
    "Pneumothorax": ("Pneumothorax",),
    "Nodule or mass": ("Nodule", "Mass"),
    "Airspace opacity": ("Consolidation", "Pneumonia", "Infiltration", "Edema"),
}
UNMAPPED = {"Fracture": "no NIH label for fractures"}
# Where the labels may sit in the data folder: Google's own folder (one file per set), or the combined
# copy with a "Set Id" column (shipped as google2019_nih-chest-xray-labels.csv.gz in torchxrayvision).
GOOGLE_FOLDER = "four_findings_expert_labels"
GOOGLE_SETS = {"validation_labels.csv": "val", "test_labels.csv": "test"}
COMBINED = ("google2019_nih-chest-xray-labels.csv.gz", "google2019_nih-chest-xray-labels.csv")
VALUES = {"YES": 1, "NO": 0}


def find_expert_files(data_dir: Path) -> list[Path]:
    """The expert label file(s) in data_dir, or an InputError saying what to put there."""
    data_dir = Path(data_dir)
    folder = [data_dir / GOOGLE_FOLDER / name for name in GOOGLE_SETS]
    if any(p.is_file() for p in folder):
        return [p for p in folder if p.is_file()]
    for name in COMBINED:
        if (data_dir / name).is_file():
            return [data_dir / name]
    raise InputError(
        f"{data_dir}: no expert labels found; put Google's {GOOGLE_FOLDER}/ folder (validation_labels.csv, "
        f"test_labels.csv) or {COMBINED[0]} there, or pass --expert FILE"
    )


def read_expert_labels(path: Path) -> pd.DataFrame:
    """Columns name, set and the four findings (0/1) of one file; bad values name the file and line."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, EOFError) as err:
        raise InputError(f"{path}: cannot read the expert labels ({err})") from None
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("Image Index", *FINDINGS) if c not in table.columns]
    if missing:
        raise InputError(
            f"{path}: no column {missing[0]!r}; expert labels need Image Index, {', '.join(FINDINGS)}"
        )
    result = pd.DataFrame({"name": table["Image Index"].str.strip()})
    if "Set Id" in table.columns:
        result["set"] = table["Set Id"].str.strip()
    else:
        result["set"] = GOOGLE_SETS.get(path.name, "")
    for finding in FINDINGS:
        values = table[finding].str.strip().str.upper()
        bad = np.flatnonzero(~values.isin(list(VALUES)).to_numpy())
        if bad.size:
            raise InputError(
                f"{path}: line {bad[0] + 2}: {finding} = {table[finding].iloc[bad[0]]!r}; expected YES or NO"
            )
        result[finding] = values.map(VALUES).astype(np.int8)
    repeated = np.flatnonzero(result["name"].duplicated().to_numpy())
    if repeated.size:
        raise InputError(
            f"{path}: line {repeated[0] + 2}: image {result['name'].iloc[repeated[0]]!r} listed twice"
        )
    return result


def read_expert(paths: Sequence[Path]) -> pd.DataFrame:
    """Every file's labels in one table; an image in two files is refused."""
    table = pd.concat([read_expert_labels(p) for p in paths], ignore_index=True)
    repeated = table["name"][table["name"].duplicated()]
    if len(repeated):
        raise InputError(f"image {repeated.iloc[0]!r} is in more than one of {', '.join(map(str, paths))}")
    return table


def mapped_findings(label_names: Sequence[str]) -> tuple[dict, dict]:
    """({finding: label columns}, {finding: why skipped}) for a run's labels."""
    columns, skipped = {}, dict(UNMAPPED)
    for finding, labels in MAPPING.items():
        absent = [name for name in labels if name not in label_names]
        if absent:
            skipped[finding] = f"the run has no {', '.join(absent)} label"
        else:
            columns[finding] = [list(label_names).index(name) for name in labels]
    return columns, skipped


def expert_metrics(
    *,
    expert: pd.DataFrame,
    names: np.ndarray,
    nih_labels: np.ndarray,
    scores: np.ndarray,
    patients: np.ndarray,
    label_names: Sequence[str],
    n_boot: int,
    seed: int,
) -> dict:
    """AUC per mapped finding against the expert labels and against the NIH labels of the same images.

    `names`, `nih_labels`, `scores` and `patients` are the scored rows (e.g. the test split); only those
    the expert file holds are used. A finding's score is the highest probability of its NIH labels.
    """
    columns, skipped = mapped_findings(label_names)
    position = pd.Index(expert["name"]).get_indexer(pd.Index(names))
    keep = np.flatnonzero(position >= 0)
    if keep.size == 0:
        raise InputError(
            "none of the scored images are in the expert labels; they cover images of the official "
            "validation and test sets (score the split holding them, e.g. --split test)"
        )
    if not columns:
        raise InputError(f"no expert finding maps to the run's labels: {skipped}")
    findings = list(columns)
    rows = expert.iloc[position[keep]]
    score = np.stack([scores[keep][:, columns[f]].max(axis=1) for f in findings], axis=1)
    nih = np.stack([nih_labels[keep][:, columns[f]].max(axis=1) for f in findings], axis=1)
    expert_y = rows[findings].to_numpy()
    common = {"groups": patients[keep], "label_names": findings, "n_boot": n_boot, "seed": seed}
    return {
        "images": int(keep.size),
        "expert_images": int(len(expert)),
        "sets": {str(k): int(v) for k, v in rows["set"].value_counts().sort_index().items()},
        "mapping": {f: list(MAPPING[f]) for f in findings},
        "skipped": skipped,
        "expert": label_metrics(expert_y, score, **common),
        "nih": label_metrics(nih, score, **common),
    }


def format_expert(result: dict, *, split: str) -> str:
    """A short table for the terminal: each finding's AUC against the expert and the NIH labels."""
    lines = [f"** {result['notice']} **"] if result.get("notice") else []
    lines += [
        f"{'finding':<18} {'positives':>9}  {'AUC expert [95% CI]':<24} {'AUC NIH labels [95% CI]':<24}"
    ]
    for finding, expert in result["expert"]["labels"].items():
        nih = result["nih"]["labels"][finding]
        lines.append(
            f"{finding:<18} {expert['positives']:>9}  {_auc(expert):<24} {_auc(nih):<24}"
            f"  (score: max of {', '.join(result['mapping'][finding])})"
        )
    lines += [f"{name:<18} skipped: {why}" for name, why in result["skipped"].items()]
    sets = ", ".join(f"{k} {v}" for k, v in result["sets"].items())
    lines.append(
        f"{result['images']} of the {result['expert_images']} expert-labelled images are in the {split} "
        f"split with features ({sets})"
    )
    return "\n".join(lines)


def _auc(metrics: dict) -> str:
    return format_auc(metrics["auc"], metrics["ci"])
