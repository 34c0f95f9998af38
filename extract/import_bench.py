"""bench import: peak memory of import-features on a full-size .npz keyed by image id (CXR Foundation's
layout), measured in a fresh process so that writing the test file does not count."""

import json
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

LIMIT_MB = 1536  # the import may use this much beyond its output array
CHUNK = 4096  # vectors drawn at a time while writing the test file
ROOT = Path(__file__).resolve().parent.parent


def bench_names(rows: int) -> list[str]:
    """Image names shaped like ChestX-ray14's, four images a patient."""
    return [f"{i // 4 + 1:08d}_{i % 4:03d}.png" for i in range(rows)]


def write_npz(path: Path, *, names: list[str], dim: int, seed: int = 0) -> Path:
    """An .npz with one float32 vector per image, keyed by id without .png, written member by member."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for start in range(0, len(names), CHUNK):
            block = rng.standard_normal((min(CHUNK, len(names) - start), dim), dtype=np.float32)
            for name, vector in zip(names[start : start + CHUNK], block, strict=True):
                with archive.open(f"{name[:-4]}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, vector)
    return path


def bench_import(*, rows: int, dim: int, workdir: Path | None = None) -> dict:
    """Write the test file, import it in a child process, report that process's peak memory."""
    with tempfile.TemporaryDirectory(prefix="cxr14-bench-import-") as tmp:
        workdir = Path(workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        source = write_npz(workdir / "embeddings.npz", names=bench_names(rows), dim=dim)
        written = time.perf_counter() - started
        job = {"source": str(source), "rows": rows, "cache_dir": str(workdir / "features")}
        child = subprocess.run(
            [sys.executable, "-c", f"from extract.import_bench import measure; measure({json.dumps(job)!r})"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise RuntimeError(f"the import under measurement failed:\n{child.stderr}")
        result = json.loads(child.stdout.splitlines()[-1])
        result |= {"rows": rows, "dim": dim, "source_mb": source.stat().st_size / 2**20}
        result |= {"write_seconds": written, "limit_mb": LIMIT_MB}
    result["within_limit"] = result["beyond_output_mb"] < LIMIT_MB
    return result


def measure(job: str) -> None:
    """In the child: import the file and print one JSON line of its memory and time."""
    from extract.imported import open_source
    from extract.importing import ImportSettings, import_features

    job = json.loads(job)
    names = bench_names(job["rows"])
    before = _peak_mb()  # the interpreter, numpy, h5py, pandas and the names
    started = time.perf_counter()
    summary = import_features(
        open_source(Path(job["source"])),
        settings=ImportSettings(name="bench_import"),
        index_names=names,
        cache_dir=Path(job["cache_dir"]),
        force=True,
    )
    seconds = time.perf_counter() - started
    output_mb = job["rows"] * summary.dim * 2 / 2**20  # float16
    peak = _peak_mb()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "baseline_mb": before,
                "peak_mb": peak,
                "output_mb": output_mb,
                "beyond_output_mb": peak - before - output_mb,
                "imported_rows": summary.rows,
                "cache_mb": summary.path.stat().st_size / 2**20,
            }
        )
    )


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def format_bench_import(r: dict) -> str:
    verdict = "within" if r["within_limit"] else "OVER"
    return "\n".join(
        [
            f"bench import: {r['rows']:,} x {r['dim']:,} float32 .npz ({r['source_mb']:,.0f} MB, written in "
            f"{r['write_seconds']:.1f} s)",
            f"  import           {r['seconds']:.1f} s, {r['imported_rows']:,} rows -> {r['cache_mb']:,.0f} MB",
            f"  peak memory      {r['peak_mb']:,.0f} MB (process before the import {r['baseline_mb']:,.0f} MB)",
            f"  beyond output    {r['beyond_output_mb']:,.0f} MB (output {r['output_mb']:,.0f} MB); "
            f"{verdict} the {r['limit_mb']:,} MB limit",
        ]
    )
