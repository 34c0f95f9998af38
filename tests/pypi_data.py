"""Real test data from data packages on PyPI: fetched once with pip and cached. A test whose data cannot be
fetched fails under CI=true (a CI that cannot fetch must not pass without running it) and skips elsewhere."""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NoReturn

import pytest

CACHE = Path(os.environ.get("CXR14_TEST_DATA", Path.home() / ".cache" / "cxr14-test-data"))
PIP_TIMEOUT_S = 300


def package_files(package: str, version: str, members: dict[str, str]) -> dict[str, Path]:
    """{name: cached file} for `members` ({name: path inside the wheel}) of package==version.

    Downloads the wheel with pip (no dependencies) the first time; when that is impossible (offline, no
    pip index) the calling test fails under CI=true and skips elsewhere, saying so.
    """
    folder = CACHE / f"{package}-{version}"
    files = {name: folder / name for name in members}
    if all(path.is_file() for path in files.values()):
        return files
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--timeout", "30"]
                + ["--dest", tmp, f"{package}=={version}"],
                capture_output=True,
                text=True,
                timeout=PIP_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            unavailable(f"cannot download {package}=={version} from PyPI: {err}")
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            unavailable(f"cannot download {package}=={version} from PyPI: {last}")
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name, member in members.items():
                part = folder / f".{name}.{os.getpid()}.tmp"
                part.write_bytes(wheel.read(member))
                os.replace(part, files[name])  # a killed download never leaves a half file under the name
    return files


def on_ci() -> bool:
    """CI=true (or 1), as CI services set it."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def unavailable(reason: str) -> NoReturn:
    """Fail the calling test under CI=true; elsewhere skip it, saying why and that CI would fail it."""
    if on_ci():
        pytest.fail(f"{reason} (CI=true: a real-data test must get its data on CI)", pytrace=False)
    pytest.skip(f"{reason}; skipped because CI is not set (under CI=true this test fails)")
