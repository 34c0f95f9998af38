"""Patient-wise train/val/test splits: the official lists, a seeded random split, or frozen lists."""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.errors import InputError
from cxr14.names import positions as rows_of
from dataset.settings import POLICIES, check_fractions

SPLITS = ("train", "val", "test")
OFFICIAL_LISTS = ("train_val_list.txt", "test_list.txt")
FROZEN_LISTS = tuple(f"{split}_list.txt" for split in SPLITS)


@dataclass(frozen=True, eq=False)
class Splits:
    assignment: np.ndarray  # (N,) object, one of SPLITS per row, aligned with index.names
    source: str  # "official" | "patient-random" | "frozen"; "synthetic sample (...)" on a make-sample set

    def mask(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return self.assignment == split


def assign_splits(
    index,
    *,
    data_dir: Path,
    policy: str,
    seed: int,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    val_fraction: float = 0.1,
    frozen_dir: str | Path = "",
) -> Splits:
    """Split the index by patient as `policy` says, and refuse any split that shares a patient."""
    if policy not in POLICIES:
        raise InputError(f"unknown split policy {policy!r}; valid: {', '.join(POLICIES)}")
    data_dir = Path(data_dir)
    if policy == "auto":
        policy = (
            "official" if all((data_dir / name).is_file() for name in OFFICIAL_LISTS) else "patient-random"
        )
    if policy == "official":
        assignment = _official(index, data_dir=data_dir, seed=seed, val_fraction=val_fraction)
    elif policy == "patient-random":
        assignment = _patient_random(index.patients, seed=seed, fractions=fractions)
    else:
        assignment = _frozen(index, frozen_dir=frozen_dir)
    shared = _shared_patients(index.patients, assignment)
    if shared.size:
        raise InputError(
            f"{shared.size} patient(s) are in more than one split under policy {policy!r} "
            f"(e.g. patient {shared[0]}); images of one patient must stay in one split: fix the split lists"
        )
    return Splits(assignment=assignment, source=policy)


def patient_overlap(patients: np.ndarray, assignment: np.ndarray) -> int:
    """How many patients have images in more than one split (must be 0)."""
    return int(_shared_patients(patients, assignment).size)


def _shared_patients(patients: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Sorted ids of the patients with images in more than one split."""
    pairs = pd.DataFrame({"patient": patients, "split": assignment}).drop_duplicates()
    counts = pairs.groupby("patient").size()
    return counts.index[counts > 1].to_numpy()


def write_split_lists(index, splits: Splits, out_dir: Path) -> list[Path]:
    """Write train_list.txt, val_list.txt, test_list.txt (one name a line) so a split can be frozen."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, file_name in zip(SPLITS, FROZEN_LISTS, strict=True):
        path = out_dir / file_name
        names = index.names[splits.mask(split)]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
        os.replace(tmp, path)  # a reader never sees half a list
        paths.append(path)
    return paths


def _official(index, *, data_dir: Path, seed: int, val_fraction: float) -> np.ndarray:
    """Official train_val / test lists; val is a seeded share of train_val's patients."""
    if not 0 <= val_fraction < 1:
        raise InputError(f"split.val_fraction must be in [0, 1), got {val_fraction}")
    for name in OFFICIAL_LISTS:
        if not (data_dir / name).is_file():
            raise InputError(f"{data_dir / name}: split list not found; use split policy 'patient-random'")
    train_val = _read_list(data_dir / OFFICIAL_LISTS[0], index)
    test = _read_list(data_dir / OFFICIAL_LISTS[1], index)
    assignment = _from_lists(index, {"train": train_val, "test": test}, files=OFFICIAL_LISTS, folder=data_dir)
    in_train_val = assignment == "train"
    candidates = np.unique(index.patients[in_train_val])
    rng = np.random.default_rng(seed)
    val_patients = rng.permutation(candidates)[: int(round(val_fraction * candidates.size))]
    assignment[in_train_val & np.isin(index.patients, val_patients)] = "val"
    return assignment


def _patient_random(patients: np.ndarray, *, seed: int, fractions: Sequence[float]) -> np.ndarray:
    """Seeded random split of the patients by `fractions` (train, val, test)."""
    fractions = check_fractions(fractions)
    unique = np.unique(patients)
    shuffled = np.random.default_rng(seed).permutation(unique)
    cuts = np.round(np.cumsum(fractions)[:2] * unique.size).astype(int)
    split_of_patient = np.empty(unique.size, dtype=object)
    for split, part in zip(SPLITS, np.split(shuffled, cuts), strict=True):
        split_of_patient[np.searchsorted(unique, part)] = split
    return split_of_patient[np.searchsorted(unique, patients)]


def _frozen(index, *, frozen_dir: str | Path) -> np.ndarray:
    """Lists written earlier by write_split_lists (train_list.txt, val_list.txt, test_list.txt)."""
    if not str(frozen_dir):
        raise InputError(
            "split policy 'frozen' needs split.frozen_dir: a folder of split lists written by the index command"
        )
    folder = Path(frozen_dir)
    for name in FROZEN_LISTS:
        if not (folder / name).is_file():
            raise InputError(
                f"{folder / name}: split list not found; write the lists there with the index command "
                "(under split policy auto) first"
            )
    rows = {split: _read_list(folder / name, index) for split, name in zip(SPLITS, FROZEN_LISTS, strict=True)}
    return _from_lists(index, rows, files=FROZEN_LISTS, folder=folder)


def _from_lists(index, rows: dict[str, np.ndarray], *, files: Sequence[str], folder: Path) -> np.ndarray:
    """Assignment from row positions per split; every image must be in exactly one list."""
    assignment = np.full(len(index), "", dtype=object)
    for split, positions in rows.items():
        taken = positions[assignment[positions] != ""]
        if taken.size:
            raise InputError(
                f"{folder}: image {index.names[taken[0]]!r} is in more than one of {', '.join(files)}; "
                "each image must be in one list"
            )
        assignment[positions] = split
    unassigned = np.flatnonzero(assignment == "")
    if unassigned.size:
        raise InputError(
            f"{folder}: {unassigned.size} image(s) of {index.csv_path.name} are in none of {', '.join(files)} "
            f"(first: {index.names[unassigned[0]]!r}); every image must be in one list"
        )
    return assignment


def _read_list(path: Path, index) -> np.ndarray:
    """Row positions of the names in a split list (one name a line, blank lines ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the split list ({e})") from e
    names = np.array([line.strip() for line in lines], dtype=object)
    keep = names != ""
    positions = rows_of(names[keep], among=index.names)
    unknown = np.flatnonzero(positions < 0)
    if unknown.size:
        line = np.flatnonzero(keep)[unknown[0]] + 1
        raise InputError(
            f"{path}: line {line}: image {names[keep][unknown[0]]!r} is not in {index.csv_path}; "
            "the list and the metadata CSV must describe the same images"
        )
    duplicated = np.flatnonzero(pd.Index(positions).duplicated())
    if duplicated.size:
        line = np.flatnonzero(keep)[duplicated[0]] + 1
        raise InputError(f"{path}: line {line}: image {names[keep][duplicated[0]]!r} is listed twice")
    return positions
