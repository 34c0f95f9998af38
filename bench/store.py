"""What the store's row checksums cost: a full-size float16 feature file read with and without them.

python -m bench.store /tmp
"""

import argparse
import time
from pathlib import Path

import numpy as np

from cache import store
from cache.checksums import checksums


def bench_checksums(directory: Path, *, rows: int = 112_120, width: int = 2_048) -> dict:
    """Seconds to read a synthetic full-size float16 file with and without the row checksums."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((rows, width), dtype=np.float32).astype(np.float16)
    names = np.array([f"{i // 4:08d}_{i % 4:03d}.png" for i in range(rows)], dtype=object)
    path = store.write_features(
        Path(directory) / "bench.h5",
        names=names,
        features=features,
        status=np.zeros(rows, np.int8),
        errors=np.full(rows, "", dtype=object),
        attrs={"backbone": "bench", "kind": "features", "dtype": "float16", "views": 1},
    )
    del features
    timings = {"read_unchecked_s": _best(lambda: _read_raw(path))}
    timings["read_checked_s"] = _best(lambda: store.read_features(path))
    read = store.read_features(path)
    arrays = dict(names=read.names, features=read.features, status=read.status, errors=read.errors)
    timings["checksums_s"] = _best(lambda: checksums(**arrays))
    path.unlink()
    return {"rows": rows, "width": width, **timings}


def _read_raw(path: Path) -> None:
    """The four datasets read as the store reads them, with no check at all: the floor a check adds to."""
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        f["names"].asstr()[()], f["features"][()], f["status"][()], f["errors"].asstr()[()]


def _best(fn, turns: int = 3) -> float:
    seconds = []
    for _ in range(turns):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return round(min(seconds), 3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="time the row checksums on a full-size synthetic file")
    parser.add_argument("directory", type=Path, help="where to write the 460 MB file (removed after)")
    print(bench_checksums(parser.parse_args().directory))
