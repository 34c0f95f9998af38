"""cxr14/temps.py: temporary names carry their writer, and only a gone writer's are cleaned up."""

import os
import subprocess
import sys

import pytest

from cxr14.temps import remove_stale_temps, temp_path


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a process that has exited (a pid is not reused this quickly)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def _temp_of(path, pid):
    """What temp_path(path) would be in process `pid` on this machine."""
    mine = temp_path(path).name
    return path.with_name(mine.replace(f".{os.getpid()}.tmp", f".{pid}.tmp"))


def test_the_temporary_name_is_hidden_beside_the_file_and_names_its_writer(tmp_path):
    temp = temp_path(tmp_path / "a.h5")
    assert temp.parent == tmp_path and temp.name.startswith(".a.h5.")
    assert temp.name.endswith(f".{os.getpid()}.tmp")


def test_only_temporaries_of_gone_writers_are_removed(tmp_path, dead_pid, live_pid):
    target = tmp_path / "x.h5"
    dead, live = _temp_of(target, dead_pid), _temp_of(target, live_pid)
    legacy = tmp_path / f".x.h5.{dead_pid}.tmp"  # the name earlier versions gave
    other_machine = tmp_path / f".x.h5.elsewhere.{dead_pid}.tmp"
    other_file = _temp_of(tmp_path / "y.h5", dead_pid)
    folder = _temp_of(tmp_path / "run", dead_pid)  # run folders are written under a temporary name too
    for path in (dead, live, legacy, other_machine, other_file):
        path.write_bytes(b"partial")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert remove_stale_temps(target) == 2
    assert not dead.exists() and not legacy.exists()
    assert live.exists(), "a live writer's temporary file was deleted"
    assert other_machine.exists(), "another machine's writer cannot be judged from here"
    assert other_file.exists()
    assert remove_stale_temps(tmp_path / "run") == 1 and not folder.exists()
    assert remove_stale_temps(tmp_path / "nowhere" / "z.h5") == 0
