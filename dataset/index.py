"""The ChestX-ray14 index: one record per image from the metadata CSV, sorted by image name."""

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.caveats import SYNTHETIC_NOTICE
from cxr14.errors import InputError
from cxr14.names import positions as rows_of
from dataset.files import find_csv  # noqa: F401  (its home until the layout step: read from here too)
from dataset.settings import LABELS
from dataset.splits import SPLITS, Splits, patient_overlap

NO_FINDING = "No Finding"
MAX_AGE = 120

# Header fields as they appear once split at commas: "OriginalImage[Width,Height]" is two fields.
# Each key lists the spellings accepted for it.
COLUMNS = {
    "name": ("Image Index",),
    "findings": ("Finding Labels",),
    "follow_up": ("Follow-up #",),
    "patient": ("Patient ID",),
    "age": ("Patient Age",),
    "sex": ("Patient Gender", "Patient Sex"),
    "view": ("View Position",),
    "width": ("OriginalImage[Width",),
    "height": ("Height]",),
}
# Largest value of each whole-number column: what its array type holds.
INT_MAX = {"patient": 2**63 - 1, "follow_up": 2**31 - 1, "width": 2**31 - 1, "height": 2**31 - 1}
SEXES = ("M", "F")
VIEWS = ("PA", "AP")


@dataclass(frozen=True, eq=False)
class Index:
    csv_path: Path
    label_names: tuple[str, ...]
    names: np.ndarray  # (N,) object str, sorted ascending: the one row order used everywhere
    labels: np.ndarray  # (N, L) uint8 multi-hot in label_names order; "No Finding" is all zeros
    patients: np.ndarray  # (N,) int64
    follow_up: np.ndarray  # (N,) int32
    age: np.ndarray  # (N,) float32 years, NaN when missing or impossible
    sex: np.ndarray  # (N,) object "M" / "F"
    view: np.ndarray  # (N,) object "PA" / "AP"
    width: np.ndarray  # (N,) int32 original width in pixels
    height: np.ndarray  # (N,) int32 original height in pixels
    ages_invalid: int

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, names: Sequence[str]) -> np.ndarray:
        """Positions of `names` in this index; an unknown name is an InputError."""
        positions = rows_of(names, among=self.names)
        unknown = np.flatnonzero(positions < 0)
        if unknown.size:
            raise InputError(
                f"image {names[unknown[0]]!r} is not in {self.csv_path} "
                f"({unknown.size} unknown name(s)); use names from the metadata CSV"
            )
        return positions.astype(np.int64)


def read_index(csv_path: Path, *, label_names: Sequence[str]) -> Index:
    """Parse a Data_Entry_2017(.csv | _v2020.csv) file, either shape, into an Index sorted by name."""
    csv_path = Path(csv_path)
    label_names = tuple(label_names)
    header = _read_header(csv_path)
    columns = _locate_columns(csv_path, header)
    table = _read_rows(csv_path, n_fields=len(header))
    # Blank lines are skipped, but row positions keep their file line numbers for messages.
    blank = (table == "").all(axis=1).to_numpy()
    lines = np.flatnonzero(~blank) + 2
    table = table.loc[~blank]
    if not len(table):
        raise InputError(f"{csv_path}: no image rows after the header; the CSV is empty")

    def column(key: str) -> pd.Series:
        return table.iloc[:, columns[key]].str.strip()

    where = _Where(csv_path, lines, header, columns)
    names = _check_names(column("name"), where)
    labels = _parse_findings(column("findings"), label_names=label_names, where=where)
    patients = _parse_int(column("patient"), key="patient", where=where).astype(np.int64)
    follow_up = _parse_int(column("follow_up"), key="follow_up", where=where).astype(np.int32)
    width = _parse_int(column("width"), key="width", where=where).astype(np.int32)
    height = _parse_int(column("height"), key="height", where=where).astype(np.int32)
    age = _parse_age(column("age"))
    sex = _parse_choice(column("sex").str.upper().str[:1], key="sex", choices=SEXES, where=where)
    view = _parse_choice(column("view").str.upper(), key="view", choices=VIEWS, where=where)

    order = np.argsort(names.astype(str), kind="stable")
    _check_unique(names[order], lines[order], csv_path)
    return Index(
        csv_path=csv_path,
        label_names=label_names,
        names=names[order],
        labels=labels[order],
        patients=patients[order],
        follow_up=follow_up[order],
        age=age[order],
        sex=sex[order],
        view=view[order],
        width=width[order],
        height=height[order],
        ages_invalid=int(np.isnan(age).sum()),
    )


@dataclass(frozen=True, eq=False)
class _Where:
    """Turns a row position into a message prefix naming the file, line and column."""

    csv_path: Path
    lines: np.ndarray
    header: list[str]
    columns: dict[str, int]

    def __call__(self, row: int, key: str) -> str:
        return f"{self.csv_path}: line {self.lines[row]}, column {self.header[self.columns[key]]!r}"


def _read_header(csv_path: Path) -> list[str]:
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            first = f.readline()
    except OSError as e:
        raise InputError(f"{csv_path}: cannot read the metadata CSV ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{csv_path}: line 1: not UTF-8 text; is this the metadata CSV?") from e
    if not first.strip():
        raise InputError(f"{csv_path}: line 1: the CSV is empty; expected the ChestX-ray14 header")
    return [field.strip() for field in next(csv.reader([first]))]


def _locate_columns(csv_path: Path, header: list[str]) -> dict[str, int]:
    columns = {}
    for key, spellings in COLUMNS.items():
        found = [i for i, field in enumerate(header) if field in spellings]
        if not found:
            raise InputError(
                f"{csv_path}: line 1: missing column {spellings[0]!r}; found {', '.join(map(repr, header))}. "
                "Expected the header of Data_Entry_2017.csv"
            )
        columns[key] = found[0]
    return columns


def _read_rows(csv_path: Path, *, n_fields: int) -> pd.DataFrame:
    try:
        table = pd.read_csv(
            csv_path,
            header=None,
            skiprows=1,
            names=list(range(n_fields)),
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            encoding="utf-8",
        )
    except pd.errors.EmptyDataError as e:
        raise InputError(f"{csv_path}: no image rows after the header; the CSV is empty") from e
    except pd.errors.ParserError as e:
        # pandas says "Expected 12 fields in line 7, saw 13" with the file's own line number.
        raise InputError(f"{csv_path}: {str(e).removeprefix('Error tokenizing data. C error: ')}") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{csv_path}: not UTF-8 text ({e.reason}); is this the metadata CSV?") from e
    return table.fillna("")


def _check_names(names: pd.Series, where: _Where) -> np.ndarray:
    values = names.to_numpy(dtype=object)
    checks = (
        (names == "", "empty image name"),
        (
            names.str.startswith(("/", "\\")) | names.str.match(r"^[A-Za-z]:"),
            "image name is an absolute path",
        ),
        (names.str.contains("..", regex=False), "image name contains '..'"),
        (names.str.contains(r"[/\\]"), "image name has a folder part; expected a bare file name"),
        # NUL cannot be stored in a feature file or passed to a file system; no real name has controls.
        (names.str.contains(r"[\x00-\x1f\x7f]"), "image name holds a control character (NUL, tab...)"),
    )
    for bad, what in checks:
        rows = np.flatnonzero(bad.to_numpy())
        if rows.size:
            raise InputError(f"{where(rows[0], 'name')}: {what}: {values[rows[0]]!r}")
    return values


def _check_unique(sorted_names: np.ndarray, sorted_lines: np.ndarray, csv_path: Path) -> None:
    same = np.flatnonzero(sorted_names[1:] == sorted_names[:-1])
    if same.size:
        first, second = sorted(sorted_lines[same[0] : same[0] + 2])
        raise InputError(
            f"{csv_path}: line {second}: duplicate image name {sorted_names[same[0]]!r} "
            f"(first on line {first}); each image must appear once"
        )


def _parse_findings(findings: pd.Series, *, label_names: tuple[str, ...], where: _Where) -> np.ndarray:
    """Multi-hot labels; parses each distinct "A|B" string once (the real file has ~800 of them)."""
    codes, uniques = pd.factorize(findings)
    column_of = {name: i for i, name in enumerate(label_names)}
    table = np.zeros((len(uniques), len(label_names)), dtype=np.uint8)
    for u, text in enumerate(uniques):
        parts = [part.strip() for part in text.split("|")]
        problem = _findings_problem(parts)
        if problem:
            raise InputError(f"{where(int(np.argmax(codes == u)), 'findings')}: {problem} in {text!r}")
        for part in parts:
            if part in column_of:
                table[u, column_of[part]] = 1
    return table[codes]


def _findings_problem(parts: list[str]) -> str:
    """What is wrong with one "A|B|C" entry, or "" if nothing; known labels outside the config are ignored."""
    if parts == [""]:
        return f"no label (write {NO_FINDING!r} for a normal image)"
    for part in parts:
        if part != NO_FINDING and part not in LABELS:
            return f"unknown label {part!r} (known: {NO_FINDING}, {', '.join(LABELS)})"
    if NO_FINDING in parts and len(parts) > 1:
        return f"{NO_FINDING!r} together with other labels"
    return ""


def _parse_int(values: pd.Series, *, key: str, where: _Where) -> np.ndarray:
    bad = np.flatnonzero(~values.str.fullmatch(r"\d+").to_numpy(dtype=bool))
    if bad.size:
        value = values.iloc[bad[0]]
        raise InputError(f"{where(bad[0], key)}: {value!r} is not a non-negative whole number")
    try:
        numbers = values.astype(np.int64).to_numpy()
        too_big = np.flatnonzero(numbers > INT_MAX[key])
    except OverflowError:  # beyond int64 (a 23-digit id): find the row with Python ints
        too_big = np.flatnonzero((values.map(int) > INT_MAX[key]).to_numpy())
    if too_big.size:
        value = values.iloc[too_big[0]]
        raise InputError(f"{where(too_big[0], key)}: {value!r} is too large (at most {INT_MAX[key]})")
    return numbers


def _parse_age(values: pd.Series) -> np.ndarray:
    """Years as float32; the old "058Y" spelling is accepted; missing or impossible ages become NaN."""
    number = values.str.extract(r"^(\d+(?:\.\d+)?)\s*[Yy]?$", expand=False)
    # A copy: pandas 3 may hand out a read-only view of its own data here.
    age = np.array(pd.to_numeric(number, errors="coerce"), dtype=np.float64, copy=True)
    age[age > MAX_AGE] = np.nan
    return age.astype(np.float32)


def _parse_choice(values: pd.Series, *, key: str, choices: tuple[str, ...], where: _Where) -> np.ndarray:
    bad = np.flatnonzero(~values.isin(choices).to_numpy())
    if bad.size:
        raise InputError(f"{where(bad[0], key)}: {values.iloc[bad[0]]!r} is not one of {', '.join(choices)}")
    return values.to_numpy(dtype=object)


def find_images(data_dir: Path, names: Sequence[str]) -> np.ndarray:
    """Path of each image, or "" when absent, under images/ or images_001/images/ .. images_012/images/.

    A name ending .png is also found as a DICOM file of the same stem (00000001_000.dcm), so a hospital's
    films can stand in for the CSV's PNG names; a file of the exact name wins. A name held only by
    something that is not a file (a folder, a broken link) gets that path, so the extraction can say what
    is there; `count_missing` counts it as missing.
    """
    found, dicoms, other = {}, {}, {}
    for folder in _image_folders(Path(data_dir)):
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    # The first folder holding a name wins, so the result does not depend on scan order.
                    is_file = _is_file(entry)
                    chosen = found if is_file else other
                    chosen.setdefault(entry.name, entry.path)
                    stem, suffix = os.path.splitext(entry.name)
                    if suffix.lower() == ".dcm" and is_file:
                        dicoms.setdefault(stem + ".png", entry.path)
        except OSError as err:
            raise InputError(f"{folder}: cannot list the image folder ({err.strerror})") from None
    return np.array(
        [found.get(name) or dicoms.get(name) or other.get(name, "") for name in names], dtype=object
    )


def _is_file(entry: os.DirEntry) -> bool:
    """Whether a folder entry is a file; a symbolic-link loop is not (the extraction says what it is),
    rather than an error that refuses the whole data set."""
    try:
        return entry.is_file()
    except OSError:
        return False


def count_missing(paths: Sequence[str]) -> int:
    """How many of `paths` (from find_images) are not image files: absent, a folder or a broken link."""
    return sum(1 for path in paths if not path or not os.path.isfile(path))


def _image_folders(data_dir: Path) -> list[Path]:
    archives = sorted(p for p in data_dir.glob("images_*") if re.fullmatch(r"images_\d+", p.name))
    # Archives unpack to images_001/images/; accept images_001/ holding the PNGs directly as well.
    candidates = [data_dir / "images"] + [q for p in archives for q in (p / "images", p)]
    return [p for p in candidates if p.is_dir()]


def summarize(
    index: Index, splits: Splits, *, missing_images: int | None = None, synthetic: bool = False
) -> dict:
    """The data set at a glance as a JSON-ready dict (keys listed in issue 2, plus per-split labels)."""
    summary = {
        "csv": str(index.csv_path),
        "synthetic": synthetic,
        "images": len(index),
        "patients": int(np.unique(index.patients).size),
        "no_finding": int((index.labels.sum(axis=1) == 0).sum()),
        "labels": _positives(index.labels, index.label_names),
        "splits": {},
        "split_source": splits.source,
        "patient_overlap": patient_overlap(index.patients, splits.assignment),
        "ages_invalid": index.ages_invalid,
        "views": _counts(index.view, VIEWS),
        "sexes": _counts(index.sex, SEXES),
    }
    for split in SPLITS:
        mask = splits.mask(split)
        summary["splits"][split] = {
            "images": int(mask.sum()),
            "patients": int(np.unique(index.patients[mask]).size),
            "no_finding": int((index.labels[mask].sum(axis=1) == 0).sum()),
            "labels": _positives(index.labels[mask], index.label_names),
        }
    if missing_images is not None:
        summary["missing_images"] = int(missing_images)
    return summary


def _positives(labels: np.ndarray, label_names: tuple[str, ...]) -> dict[str, int]:
    return {name: int(n) for name, n in zip(label_names, labels.sum(axis=0, dtype=np.int64), strict=True)}


def _counts(values: np.ndarray, choices: tuple[str, ...]) -> dict[str, int]:
    return {choice: int((values == choice).sum()) for choice in choices}


def format_summary(summary: dict) -> str:
    """A human-readable table of `summarize`'s output, for `run.py index`."""
    splits = summary["splits"]
    lines = [f"** {SYNTHETIC_NOTICE} **"] if summary.get("synthetic") else []
    lines += [
        f"metadata     {summary['csv']}",
        f"images       {summary['images']:,} from {summary['patients']:,} patients",
        f"splits       {summary['split_source']}; patients in more than one split: {summary['patient_overlap']}",
        "views        " + ", ".join(f"{k} {v:,}" for k, v in summary["views"].items()),
        "sexes        " + ", ".join(f"{k} {v:,}" for k, v in summary["sexes"].items()),
        f"ages invalid {summary['ages_invalid']:,} (impossible or missing; kept, age treated as unknown)",
    ]
    if "missing_images" in summary:
        lines.append(f"images missing on disk {summary['missing_images']:,}")
    width = max(len(name) for name in [*summary["labels"], "No Finding"])
    lines += ["", f"{'':<{width}}  {'all':>8}" + "".join(f"  {s:>8}" for s in splits)]
    rows = [("images", summary["images"], [s["images"] for s in splits.values()])]
    rows.append(("patients", summary["patients"], [s["patients"] for s in splits.values()]))
    rows.append(("No Finding", summary["no_finding"], [s["no_finding"] for s in splits.values()]))
    rows += [(name, n, [s["labels"][name] for s in splits.values()]) for name, n in summary["labels"].items()]
    for name, total, per_split in rows:
        lines.append(f"{name:<{width}}  {total:>8,}" + "".join(f"  {n:>8,}" for n in per_split))
    return "\n".join(lines)
