"""Temporary names for files and folders written whole and then renamed into place, and the cleanup of
those whose writer is gone (killed, or stopped by a full disk) — never of a writer still at work."""

import os
import re
import shutil
import socket
from pathlib import Path

# .<name>.<host>.<pid>.tmp: the host, because workers of one job array share a file system and a pid
# means nothing on another machine. Earlier versions wrote .<name>.<pid>.tmp (taken as this host's).
_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.tmp$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def _host() -> str:
    # Dots would make the name ambiguous; the short host name is enough to tell machines apart.
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def temp_path(path: Path) -> Path:
    """This process's temporary name for `path`, in the same folder (so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.tmp")


def _writer(temp: Path, target: str) -> tuple[str, int] | None:
    """(host, pid) of the writer of `temp`, a temporary of the file named `target`; None if it is not one."""
    name = Path(temp).name
    match = _PATTERN.match(name)
    if match and match["name"] == target:
        return match["host"], int(match["pid"])
    match = _LEGACY.match(name)
    if match and match["name"] == target:
        return _host(), int(match["pid"])
    return None


def writer_alive(host: str, pid: int) -> bool:
    """Whether process `pid` on `host` may still be running (True when that cannot be known)."""
    if host != _host():
        return True  # another machine's writer: not ours to judge
    if pid == os.getpid():
        return False  # our own leftover: this process is not writing it now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a live process of another user
    return True


def remove_stale_temps(path: Path) -> int:
    """Delete the temporaries of `path` whose writer is gone; returns how many were removed."""
    path = Path(path)
    removed = 0
    if not path.parent.is_dir():
        return 0
    for temp in path.parent.glob(f".{_glob_escape(path.name)}.*.tmp"):
        writer = _writer(temp, path.name)
        if writer is None or writer_alive(*writer):
            continue
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        removed += 1
    return removed


def _glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)
