"""bench curve: a learning curve (heads x fractions x seeds) on a planted cache of the full ChestX-ray14
size, as bench heads makes it, timed end to end (the load counts, as a curve's does)."""

import dataclasses
import os
import resource
import time
from pathlib import Path

from bench.heads import BACKBONE, write_bench_cache
from bench.planted import planted_index
from experiments.config import Config


def bench_curve(
    *,
    config: Config,
    heads,
    sizes,
    seeds: int,
    rows: int = 112120,
    dim: int = 2048,
    workdir: Path,
    seed: int = 0,
) -> dict:
    """Each head's curve on the planted cache (one curve folder, one line per head): times and points."""
    from experiments.curve import draw_curve, plan_lines
    from heads.data import load_head_data

    workdir = Path(workdir)
    config = dataclasses.replace(config, cache_dir=workdir / "features", runs_dir=workdir / "runs")
    index, splits = planted_index(rows, seed=seed)
    write_bench_cache(config.cache_dir, index=index, dim=dim, seed=seed)
    start = time.perf_counter()
    data = load_head_data(
        cache_dir=config.cache_dir, backbones=[BACKBONE], index=index, splits=splits, metadata=True
    )
    load_s = time.perf_counter() - start
    plans = plan_lines(config, heads=heads, backbone_sets=[BACKBONE], changes={})
    curve = draw_curve(config, data=data, plans=plans, sizes=sizes, seeds=seeds, name="bench-curve")
    lines = {}
    for row in curve["summary"]:
        lines.setdefault(row["line"], 0.0)
        lines[row["line"]] += row["seconds"]
    return {
        "rows": rows,
        "dim": dim,
        "train_rows": int(data.rows("train").size),
        "sizes": [s.label for s in sizes],
        "seeds": seeds,
        "load_s": round(load_s, 1),
        "line_s": {line: round(s, 1) for line, s in lines.items()},
        "total_s": round(time.perf_counter() - start, 1),
        "curve": {k: curve[k] for k in ("summary", "fits", "metadata_baseline")},
        "cpu_threads": len(os.sched_getaffinity(0)),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def format_bench_curve(result: dict) -> str:
    """bench curve's figures for people."""
    from results.curve import format_fit

    r = result
    lines = [
        f"bench curve: {r['rows']:,} rows x {r['dim']:,} float16 ({r['train_rows']:,} for training), "
        f"sizes {', '.join(r['sizes'])} x {r['seeds']} seeds, {r['cpu_threads']} threads, load average "
        f"{r['load_average'][0]} at the end",
        f"  load             {r['load_s']:.1f} s",
    ]
    for line, seconds in r["line_s"].items():
        fit = r["curve"]["fits"][line]
        lines.append(f"  {line:<16} {seconds:.0f} s for its points; {format_fit(fit)}")
    lines += [f"  total            {r['total_s']:.0f} s; peak memory {r['peak_memory_mb']:,.0f} MB"]
    return "\n".join(lines)
