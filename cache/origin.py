"""Which data set a cache was extracted from: a fingerprint of the index's rows, written at extraction and
checked wherever a cache is joined to an index, since the join itself is by image name only.

It hashes what ties a feature row to its image in the index — the image name, the patient and the labels —
not the CSV's bytes: the CSV comes in two spellings (with and without a trailing comma) holding the same
rows, and an age or pixel-spacing fix does not change which image a row's features came from. Labels are
hashed one column each, so a config that trains on fewer labels still checks the ones it has. Labels are
what tell two make-sample data sets apart (same names and patients, other films). Two data sets that agree
on names, patients and labels yet hold other images cannot be told apart without reading the images again.
"""

import hashlib
from pathlib import Path

import numpy as np

from cache.store import MadeDifferently
from cxr14.names import positions


def index_fingerprint(index, *, rows: np.ndarray) -> dict:
    """The `dataset` attribute of a cache holding index rows `rows`, in that order.

    `index`: anything with aligned `names`, `patients`, `labels` (N, L) and `label_names` (extract's Index).
    """
    rows = np.asarray(rows, dtype=np.int64)
    names = np.asarray(index.names, dtype=object)[rows]
    patients = np.asarray(index.patients)[rows]
    lines = "".join(f"{name}\t{int(patient)}\n" for name, patient in zip(names, patients, strict=True))
    labels = np.asarray(index.labels)[rows]
    return {
        "rows": len(rows),
        "names_patients": _sha256(lines.encode()),
        "labels": {
            name: _sha256(np.ascontiguousarray(labels[:, j], dtype=np.uint8).tobytes())
            for j, name in enumerate(index.label_names)
        },
    }


def check_origin(path: Path, *, recorded, names: np.ndarray, index) -> None:
    """Refuse a cache (stored `names`, file order) extracted from another data set than `index`.

    A cache that records no `dataset` (features of one's own) has nothing to check.
    """
    if recorded is None:
        return
    _check_shape(path, recorded)
    where = positions(names, among=index.names)
    csv = index.csv_path
    if (where < 0).any():
        raise MadeDifferently(
            f"{path} was extracted from another data set than {csv}: {int((where < 0).sum())} of its "
            f"{len(names)} images are not in it; point --data-dir at the data set it came from, or "
            "re-extract it from scratch"
        )
    now = index_fingerprint(index, rows=where)
    differ = [] if now["names_patients"] == recorded["names_patients"] else ["patients"]
    differ += [
        f"labels {name}"
        for name, digest in now["labels"].items()
        if name in recorded["labels"] and recorded["labels"][name] != digest
    ]
    if differ:
        raise MadeDifferently(
            f"{path} was extracted from another data set than {csv}: the same image names, other "
            f"{', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}; point --data-dir at the data set "
            "it came from, or re-extract it from scratch"
        )


def _check_shape(path: Path, recorded) -> None:
    """A hand-edited `dataset` attribute is refused by name, not met with a KeyError."""
    fields = recorded if isinstance(recorded, dict) else {}
    labels = fields.get("labels")
    hashes = isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())
    if not (isinstance(fields.get("names_patients"), str) and hashes):
        raise MadeDifferently(
            f"{path}: attribute dataset is not the data set fingerprint cache/README.md describes "
            "(names_patients: a hash, labels: a hash per label); re-extract it from scratch"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
