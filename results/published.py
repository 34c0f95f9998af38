"""Published per-disease ROC AUCs (results/published.csv) to put beside a run's results."""

import csv
from pathlib import Path

from cxr14.errors import InputError

_SOURCE_PREFIX = "# source:"
_SOURCE_FIELDS = ("key", "title", "citation", "split")


def published_path() -> Path:
    """The data file shipped with the package."""
    return Path(__file__).with_name("published.csv")


def _parse_source(line: str, *, path: Path, line_no: int) -> dict:
    fields = [part.strip() for part in line[len(_SOURCE_PREFIX) :].split("|")]
    if len(fields) != len(_SOURCE_FIELDS) or not all(fields):
        raise InputError(
            f"{path}:{line_no}: a source line needs {len(_SOURCE_FIELDS)} non-empty fields "
            f"({' | '.join(_SOURCE_FIELDS)}); received {line.strip()!r}"
        )
    return dict(zip(_SOURCE_FIELDS, fields, strict=True))


def _parse_auc(text: str, *, path: Path, line_no: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{path}:{line_no}: auc must be a number between 0 and 1; received {text!r}")
    return value


def load_published(path: Path | None = None) -> dict:
    """{source_key: {"title", "citation", "split", "auc": {label: value}}} in the file's order."""
    path = Path(path) if path is not None else published_path()
    lines = path.read_text(encoding="utf-8").splitlines()
    published: dict[str, dict] = {}
    data_lines = []
    for line_no, line in enumerate(lines, start=1):
        if line.startswith(_SOURCE_PREFIX):
            source = _parse_source(line, path=path, line_no=line_no)
            published[source.pop("key")] = {**source, "auc": {}}
        elif line.strip() and not line.startswith("#"):
            data_lines.append((line_no, line))
    if not data_lines or data_lines[0][1].replace(" ", "") != "source,label,auc":
        raise InputError(f"{path}: the first data line must be the header 'source,label,auc'")
    for (line_no, _), row in zip(data_lines[1:], csv.reader(line for _, line in data_lines[1:]), strict=True):
        if len(row) != 3:
            raise InputError(f"{path}:{line_no}: expected 3 fields source,label,auc; received {row}")
        key, label, auc = (field.strip() for field in row)
        if key not in published:
            raise InputError(
                f"{path}:{line_no}: source {key!r} has no '# source:' line; declared: {list(published)}"
            )
        if label in published[key]["auc"]:
            raise InputError(f"{path}:{line_no}: {key} gives {label!r} twice")
        published[key]["auc"][label] = _parse_auc(auc, path=path, line_no=line_no)
    return published
