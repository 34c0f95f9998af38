"""What made a run: the library versions, the git commit (and whether the tree had changes) and the command
line, recorded in every run folder's config.json. Light: package metadata and one git call, no imports of
the libraries themselves."""

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LIBRARIES = ("tensorflow", "keras", "numpy", "h5py", "scikit-learn", "pandas")
UNKNOWN = "unknown"


def made_by(*, source_dir: Path) -> dict:
    """Versions, git state of `source_dir` and the command line of this process."""
    return {
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in LIBRARIES}},
        "git": git_state(source_dir),
        "command": list(sys.argv),
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def git_state(source_dir: Path) -> dict:
    """{"commit": sha, "dirty": bool}; "unknown" for both where git or the repository is missing."""
    commit = _git(source_dir, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": UNKNOWN, "dirty": UNKNOWN}
    changes = _git(source_dir, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": UNKNOWN if changes is None else bool(changes)}


def _git(source_dir: Path, *words: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(source_dir), *words], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine, or a hung one
        return None
    return done.stdout.strip() if done.returncode == 0 else None
