"""bench tokens: an attention head trained from a token cache larger than its memory budget, streamed
from disk, against the time to read the cache once from disk.

A planted token cache (default 112,120 images x 49 tokens x 256 channels float16 = 2.81 GB, a ResNet-like
7 x 7 map with fewer channels, so that it fits this machine's disk and a bench run's time) is written in
a fresh process, then trained on in another with [train] token_memory_gb = 1 GB (default): the cache is
2.8 times the budget, so it streams. Fresh processes, so that the training's peak memory is its own (a
process's peak RSS only ever grows, and writing the cache holds it whole).

Times: sequential reads of the cache (the floor: every epoch reads each training row once; the median of
three, as this disk's read time varies from one read to the next), the load
(its checking pass over every row), the probe start (one pass: the tokens' mean and scale together),
two training epochs (the first traces the step function) and one streamed validation scoring. The page
cache is dropped before each timed read where this process may (root: /proc/sys/vm/drop_caches), so each
reads from disk; where it may not, the result says so, and the file then sits in the page cache after
the first read.
"""

import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from bench.planted import planted_index
from bench.processes import in_fresh_process
from cache.paths import cache_path
from cache.store import merge_shards, read_attrs, write_shard
from cxr14.errors import InputError

BACKBONE = "bench_tokens"
TOKENS, CHANNELS = 49, 256
BUDGET_GB = 1.0
ALLOWANCE_GB = 1.5  # what peak memory may take beyond the budget (TensorFlow, the probe, the head)
STRENGTH = 2.0  # of each image's findings, added to one token of its own
CHUNK = 4096
READS = 3  # timed reads of the whole cache, each from disk where the page cache may be dropped


def bench_tokens(
    *,
    rows: int = 112_120,
    tokens: int = TOKENS,
    channels: int = CHANNELS,
    budget_gb: float = BUDGET_GB,
    workdir: Path,
    head,
    seed: int = 0,
    memory: bool = True,
    drop_cache: bool = True,
) -> dict:
    """Write the planted token cache, then time reading it and training an attention head streaming it;
    `head`: the attention head's preset (HeadConfig); `memory`: also train it with the cache loaded
    whole (in a third process), to set the head's own time beside the streamed epoch; `drop_cache`: drop
    the page cache before each timed read (root only; tests leave the machine's cache alone)."""
    cache_dir = Path(workdir) / "features"
    shape = {"rows": rows, "tokens": tokens, "channels": channels, "seed": seed}
    written = kept_token_cache(cache_dir, **shape) or in_fresh_process(
        write_token_cache, cache_dir=cache_dir, **shape
    )
    before = os.getloadavg()
    job = {"cache_dir": cache_dir, "rows": rows, "seed": seed, "head": head}
    timed = in_fresh_process(time_streaming, **job, budget_gb=budget_gb, drop_cache=drop_cache)
    if memory:
        timed |= in_fresh_process(time_in_memory, **job)
    limit_mb = (budget_gb + ALLOWANCE_GB) * 1000
    return {
        **shape,
        "cache_gb": round(written["bytes"] / 1e9, 2),
        "write_s": written["seconds"],
        "budget_gb": budget_gb,
        **timed,
        "limit_mb": round(limit_mb),
        "within_memory": timed["peak_mb"] <= limit_mb,
        "epoch_over_read": round(timed["epoch_s"] / max(timed["read_s"], 1e-3), 2),
        "stream_over_read": round(timed["stream_pass_s"] / max(timed["read_s"], 1e-3), 2),
        **(
            {"streamed_over_memory": round(timed["epoch_s"] / max(timed["memory_epoch_s"], 1e-3), 2)}
            if memory
            else {}
        ),
        "cpu_threads": len(os.sched_getaffinity(0)),
        "load_average_before": [round(x, 2) for x in before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _recipe(*, rows: int, tokens: int, channels: int, seed: int) -> str:
    """What a planted token cache is made from, kept as its fingerprint: the same recipe, the same file."""
    return f"bench tokens {rows} x {tokens} x {channels} seed {seed}"


def kept_token_cache(cache_dir: Path, **shape) -> dict | None:
    """A planted token cache already in `cache_dir` from the same recipe (a rerun with the same --workdir:
    a full-size 49 x 2,048 map takes minutes to write), as write_token_cache reports it; None otherwise."""
    path = cache_path(cache_dir, BACKBONE)
    if not path.is_file():
        return None
    try:
        attrs = read_attrs(path)
    except (InputError, OSError):
        return None  # unreadable: written again
    if attrs.get("fingerprint") != _recipe(**shape):
        return None
    return {"bytes": _cache_bytes(**shape), "seconds": "kept", "path": str(path)}


def _cache_bytes(*, rows: int, tokens: int, channels: int, **_) -> int:
    return rows * tokens * channels * np.dtype(np.float16).itemsize


def write_token_cache(*, cache_dir: Path, rows: int, tokens: int, channels: int, seed: int) -> dict:
    """Noise tokens, each image's findings in one token of its own (as the planted local problem): what
    pooling dilutes by the token count and attention need not. Written through the feature store as
    extraction writes it, CHUNK rows a shard, then merged a shard at a time: the whole map never sits in
    memory (ResNet-50's 49 x 2,048 at full size is 22.5 GB)."""
    start = time.perf_counter()
    index, _ = planted_index(rows, seed=seed)
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((index.labels.shape[1], channels)).astype(np.float32)
    directions *= STRENGTH / np.linalg.norm(directions, axis=1, keepdims=True)
    shards = Path(cache_dir) / f".{BACKBONE}.shards"
    attrs = {"backbone": BACKBONE, "kind": "tokens", "dtype": "float16", "views": 1, "synthetic": True}
    recipe = _recipe(rows=rows, tokens=tokens, channels=channels, seed=seed)  # shards of one recipe merge
    attrs |= {"shard_size": CHUNK, "fingerprint": recipe}
    for begin in range(0, rows, CHUNK):
        stop = min(begin + CHUNK, rows)
        block = rng.standard_normal((stop - begin, tokens, channels), dtype=np.float32)
        where = rng.integers(0, tokens, stop - begin)
        block[np.arange(stop - begin), where] += index.labels[begin:stop] @ directions
        write_shard(shards, start=begin, stop=stop, total_rows=rows, names=index.names[begin:stop],
                    features=block.astype(np.float16), status=np.zeros(stop - begin, np.int8),
                    errors=np.full(stop - begin, "", dtype=object), attrs=attrs)  # fmt: skip
    path = merge_shards(shards, out_path=cache_path(cache_dir, BACKBONE))
    shutil.rmtree(shards)
    nbytes = _cache_bytes(rows=rows, tokens=tokens, channels=channels)
    return {"bytes": nbytes, "seconds": round(time.perf_counter() - start, 1), "path": str(path)}


def time_streaming(
    *, cache_dir: Path, rows: int, seed: int, budget_gb: float, head, drop_cache: bool
) -> dict:
    """In this (fresh) process: the read floor, the load, then training as _time_training times it, the
    cache streamed; the page cache dropped before each timed read; peak memory."""
    from cache.stream import StreamedFeatures, read_through
    from heads.data import load_head_data

    path = cache_path(cache_dir, BACKBONE)
    baseline_mb = _peak_mb()  # the libraries, before any row is read (TensorFlow comes with heads.data)
    index, splits = planted_index(rows, seed=seed)
    dropped = drop_page_cache() if drop_cache else "not dropped (drop_cache=False)"
    result = {"page_cache": dropped, "cached_before_read": in_page_cache(path)}
    # This disk's read time of the same file varies up to four-fold from one dropped read to the next (a
    # 0.75 GB cache: 0.36 to 1.6 s), so the floor is the median of READS reads, each from a dropped cache.
    reads = []
    for i in range(READS):
        if i and drop_cache:
            drop_page_cache()
        reads.append(_timed(lambda: read_through(path)))
    result["reads_s"], result["read_s"] = reads, round(float(np.median(reads)), 3)
    if drop_cache:
        drop_page_cache()
    started = time.perf_counter()
    data = load_head_data(
        cache_dir=cache_dir, backbones=[BACKBONE], index=index, splits=splits, metadata=False,
        token_memory_gb=budget_gb,
    )  # fmt: skip
    result["load_s"] = round(time.perf_counter() - started, 2)
    assert isinstance(data.features[BACKBONE], StreamedFeatures), "the bench cache must exceed the budget"
    result |= _time_training(data, head=head, seed=seed, path=path, stream_pass=True, drop_cache=drop_cache)
    return {**result, "baseline_mb": baseline_mb, "peak_mb": _peak_mb()}


def time_in_memory(*, cache_dir: Path, rows: int, seed: int, head) -> dict:
    """The same training with the cache loaded whole (a budget above it): the head's own time, which a
    streamed epoch adds its reads to. Keys prefixed memory_."""
    from heads.data import load_head_data

    index, splits = planted_index(rows, seed=seed)
    data = load_head_data(
        cache_dir=cache_dir, backbones=[BACKBONE], index=index, splits=splits, metadata=False,
        token_memory_gb=1e6,
    )  # fmt: skip
    timed = _time_training(data, head=head, seed=seed, path=None, stream_pass=False, drop_cache=False)
    return {f"memory_{key}": value for key, value in {**timed, "peak_mb": _peak_mb()}.items()}


def _time_training(data, *, head, seed: int, path: Path | None, stream_pass: bool, drop_cache: bool) -> dict:
    """The probe start, one pass over the training batches alone (`stream_pass`), two training epochs
    (the first traces the step function) and a validation scoring; the page cache dropped before each
    with `drop_cache`; `path`: the streamed cache, whose share in the page cache is recorded."""
    from heads.scoring import predict_probabilities
    from heads.settings import TrainConfig
    from heads.start import fit_start

    def fresh() -> None:
        if drop_cache:
            drop_page_cache()

    split_rows = {split: data.rows(split) for split in ("train", "val")}
    train = TrainConfig(seed=seed).sized_for(split_rows["train"].size)
    result = {"train_rows": int(split_rows["train"].size), "val_rows": int(split_rows["val"].size)}
    fresh()
    started = time.perf_counter()
    begin = fit_start(data, rows=split_rows, max_directions=0, seed=seed)
    result["start_s"] = round(time.perf_counter() - started, 2)
    fit_model, model, batches = _training(data, head=head, train=train, begin=begin, rows=split_rows["train"])
    if stream_pass:  # the batches alone: reading, shuffling and batching, no head
        fresh()
        result["stream_pass_s"] = _timed(lambda: sum(1 for _ in batches))
    for epoch in (1, 2):
        fresh()
        if path is not None:
            result[f"cached_before_epoch_{epoch}"] = in_page_cache(path)
        result[f"epoch_{epoch}_s"] = _timed(
            lambda: fit_model.fit(batches, epochs=1, shuffle=False, verbose=0)
        )
    result["epoch_s"] = result["epoch_2_s"]
    fresh()
    result["validation_s"] = _timed(lambda: predict_probabilities(model, data, split_rows["val"]))
    return {**result, "batch_size": train.batch_size}


def _training(data, *, head, train, begin, rows):
    """(model to fit, the head, its streamed batches), built and compiled as train_head builds them."""
    from heads.models import build_head
    from heads.train import compile_for_training, head_spec, training_setup

    spec = head_spec(data, head=head, train=train, n_labels=data.labels.shape[1], start=begin)
    model = build_head(**spec, byte_dropout=True)
    fit_model, batches = training_setup(
        model, data=data, rows=rows, train=train, correction=begin.train_correction
    )
    compile_for_training(fit_model, train=train, labels_train=data.labels[rows])
    return fit_model, model, batches


def drop_page_cache() -> str:
    """Drop the page cache (root only) so that the next read comes from disk; what happened, in words."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped before each timed read"
    except OSError as err:
        return f"not dropped ({err.strerror}): reads after the first may come from the page cache"


def in_page_cache(path: Path) -> str:
    """How much of the file the page cache holds (util-linux fincore), or "unknown"."""
    try:
        out = subprocess.run(
            ["fincore", "-nb", "-o", "RES", str(path)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    value = out.stdout.strip()
    return f"{int(value) / 1e6:.0f} MB" if out.returncode == 0 and value.isdigit() else "unknown"


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return round(time.perf_counter() - started, 3)


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def format_bench_tokens(result: dict) -> str:
    """bench tokens' figures for people: a line a step, its name in a column of its own."""
    r = result
    rows = [
        ("token cache", f"{r['rows']:,} x {r['tokens']} x {r['channels']} float16 = {r['cache_gb']} GB (budget "
                        f"{r['budget_gb']:g} GB: streamed)"),
        ("page cache", f"{r['page_cache']}; held before the read {r['cached_before_read']}, before epoch 2 "
                       f"{r['cached_before_epoch_2']}"),
        ("written", f"{r['write_s']} s" if r["write_s"] != "kept" else "kept from an earlier run (same recipe)"),
        ("read once", f"{r['read_s']} s, the median of {r['reads_s']} "
                      f"({r['cache_gb'] / max(r['read_s'], 1e-3):.2f} GB/s)"),
        ("load (check pass)", f"{r['load_s']} s"),
        ("probe start", f"{r['start_s']} s (the mean of the tokens and their scale: one pass)"),
        ("batches alone", f"{r['stream_pass_s']} s (read, shuffled, batched; {r['stream_over_read']} x the read)"),
        ("epoch 1 / 2", f"{r['epoch_1_s']} s / {r['epoch_2_s']} s ({r['train_rows']:,} rows, batch "
                        f"{r['batch_size']}); epoch / read {r['epoch_over_read']} (target <= 1.5)"),
    ]  # fmt: skip
    if "memory_epoch_s" in r:
        loaded = f"epoch 2 {r['memory_epoch_s']} s, peak {r['memory_peak_mb']:.0f} MB: streamed / loaded "
        rows.append(("loaded whole", loaded + str(r["streamed_over_memory"])))
    rows += [
        ("validation score", f"{r['validation_s']} s ({r['val_rows']:,} rows, streamed)"),
        ("peak memory", f"{r['peak_mb']:.0f} MB (limit {r['limit_mb']} MB = budget + {ALLOWANCE_GB} GB; "
                        f"{r['baseline_mb']:.0f} MB before any row)"),
        ("load average", f"{r['load_average_before']} -> {r['load_average_after']}"),
    ]  # fmt: skip
    return "\n".join(f"{name:<18} {text}" for name, text in rows)
