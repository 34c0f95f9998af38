"""Files and folders the user names for outputs (--csv, --out, --heatmap): checked before any work, so a
target that cannot be written is one line at once, not a traceback after every prediction was made."""

import os
from pathlib import Path

from cxr14.errors import InputError


def check_output_file(path: Path, *, what: str) -> Path:
    """`path` if a file can be written there: not a folder, in a folder that exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; name a file to write")
    if not path.parent.is_dir():
        raise InputError(
            f"{what} {path}: the folder {path.parent} does not exist or is a file; create it first"
        )
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{what} {path} cannot be written (permission denied)")
    return path


def check_output_folder(path: Path, *, what: str) -> Path:
    """`path` if it is, or can be made, a writable folder: neither it nor the nearest existing folder
    above it is a file."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None:
        if not existing.is_dir():
            raise InputError(f"{what} {path}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK):
            raise InputError(f"{what} {path}: {existing} cannot be written (permission denied)")
    return path
