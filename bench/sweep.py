"""bench sweep: one train-head fc run and a sweep of 8 fc trials (4 learning rates x 2 dropouts) on the
planted cache of the full ChestX-ray14 size that bench heads writes, each in a fresh process, timed from
its load to its last file; then some trials trained alone, to set their validation AUC beside the sweep's.

Fresh processes, so that each peak memory is its own (a process's peak RSS only ever grows) and neither
run inherits the other's compiled graphs. The times leave out the import of TensorFlow, the same in both.
"""

import dataclasses
import os
import resource
import time
from pathlib import Path

from bench.heads import BACKBONE, write_bench_cache
from bench.planted import planted_index
from bench.processes import in_fresh_process
from experiments.config import Config

LRS = (3e-4, 1e-3, 3e-3, 1e-2)
DROPOUTS = (0.1, 0.3)
# How many of the sweep's trials are trained again alone (each costs about one train-head run).
ALONE = 2


def sweep_grid(*, lrs=LRS, dropouts=DROPOUTS) -> str:
    """The bench's grid file: fc on the planted cache, lr x dropout."""
    return "\n".join(
        [
            'head = ["fc"]',
            f'backbone = ["{BACKBONE}"]',
            f"lr = [{', '.join(map(repr, lrs))}]",
            f"dropout = [{', '.join(map(repr, dropouts))}]",
            "",
        ]
    )


def bench_sweep(
    *, config: Config, rows: int = 112120, dim: int = 2048, workdir: Path, seed: int = 0, alone: int = ALONE
) -> dict:
    """Wall times of one train-head fc and of the 8-trial sweep, their ratio and peak memories; the
    validation mean AUC of `alone` trials in the sweep and trained alone with the same seed."""
    workdir = Path(workdir)
    config = dataclasses.replace(config, cache_dir=workdir / "features", runs_dir=workdir / "runs")
    index, _ = planted_index(rows, seed=seed)
    write_bench_cache(config.cache_dir, index=index, dim=dim, seed=seed)
    grid = workdir / "grid.toml"
    grid.write_text(sweep_grid(), encoding="utf-8")
    job = {"config": config, "rows": rows, "seed": seed}
    one = in_fresh_process(time_train_head, **job)
    sweep = in_fresh_process(time_sweep, **job, grid=grid, name="bench-sweep")
    picked = list(sweep["trials"])[:alone]
    alone_aucs = in_fresh_process(train_alone, **job, grid=grid, trials=picked) if picked else {}
    return {
        "rows": rows,
        "dim": dim,
        "trials": len(sweep["trials"]),
        "train_head_s": one["seconds"],
        "train_head_peak_mb": one["peak_mb"],
        "train_head_epochs": one["epochs"],
        "sweep_s": sweep["seconds"],
        "sweep_peak_mb": sweep["peak_mb"],
        "ratio": round(sweep["seconds"] / one["seconds"], 2),
        "sweep_val_mean_auc": sweep["trials"],
        "sweep_epochs": sweep["epochs"],
        "alone_val_mean_auc": alone_aucs,
        "most_difference": max((abs(sweep["trials"][t] - a) for t, a in alone_aucs.items()), default=None),
        "cpu_threads": len(os.sched_getaffinity(0)),
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }


def _load(config: Config, *, rows: int, seed: int):
    from heads.data import load_head_data

    index, splits = planted_index(rows, seed=seed)
    return load_head_data(
        cache_dir=config.cache_dir, backbones=[BACKBONE], index=index, splits=splits, metadata=True
    )


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def time_train_head(*, config: Config, rows: int, seed: int) -> dict:
    """A train-head --head fc run (load, fit, score on test, write), as the command trains it."""
    from experiments.experiment import plan_run, sized_for_data
    from experiments.provenance import snapshot
    from heads.train import train_head

    start = time.perf_counter()
    data = _load(config, rows=rows, seed=seed)
    plan = sized_for_data(plan_run(config, kind="fc", backbones=BACKBONE), data)
    metrics = train_head(
        run_dir=config.runs_dir / "bench-train-head",
        data=data,
        head=plan.head,
        train=plan.train,
        label_names=config.labels,
        config_snapshot=snapshot(config, plan, caches=data.caches, synthetic=data.synthetic),
        force=True,
        progress=False,
        decision=config.decision,
    )
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "epochs": metrics["epochs"],
        "peak_mb": _peak_mb(),
    }


def time_sweep(*, config: Config, rows: int, seed: int, grid: Path, name: str) -> dict:
    """The sweep from its load to its leaderboard; each trial's validation mean AUC and epochs."""
    import shutil

    from experiments.sweep import run_sweep
    from results.record import read_results

    shutil.rmtree(config.runs_dir / name, ignore_errors=True)  # every trial trains: no resume
    start = time.perf_counter()
    data = _load(config, rows=rows, seed=seed)
    result = run_sweep(config, grid_path=grid, name=name, data=data)
    seconds = round(time.perf_counter() - start, 1)
    epochs = {
        t: read_results(config.runs_dir / name / t / "metrics.json").as_dict()["epochs"]
        for t in result["trials"]
    }
    return {"seconds": seconds, "trials": result["trials"], "epochs": epochs, "peak_mb": _peak_mb()}


def train_alone(*, config: Config, rows: int, seed: int, grid: Path, trials: list[str]) -> dict:
    """Each named trial of the grid trained by itself (a sweep of that one trial: train_head, the same
    seed); its validation mean AUC."""
    from experiments.sweep import expand_grid, read_grid, run_sweep, trial_name

    data = _load(config, rows=rows, seed=seed)
    axes, fixed = read_grid(grid)
    combos = {trial_name(combo, axes=list(axes)): combo for combo in expand_grid(axes, fixed)}
    aucs = {}
    for trial in trials:
        combo = combos[trial]
        one = grid.with_name(f"alone-{trial}.toml")
        one.write_text(
            f'head = ["fc"]\nbackbone = ["{BACKBONE}"]\n[fixed]\nlr = {combo["lr"]!r}\n'
            f"dropout = {combo['dropout']!r}\n",
            encoding="utf-8",
        )
        result = run_sweep(config, grid_path=one, name=f"bench-alone-{trial}", data=data)
        (aucs[trial],) = result["trials"].values()
    return aucs


def format_bench_sweep(result: dict) -> str:
    """bench sweep's figures for people."""
    r = result
    lines = [
        f"bench sweep: {r['rows']:,} rows x {r['dim']:,} float16, {r['cpu_threads']} threads, load average "
        f"{r['load_average'][0]} at the end",
        f"  train-head fc    {r['train_head_s']:.0f} s ({r['train_head_epochs']} epochs), peak "
        f"{r['train_head_peak_mb']:,.0f} MB",
        f"  sweep            {r['sweep_s']:.0f} s for {r['trials']} trials, {r['ratio']:.2f}x one train-head; "
        f"peak {r['sweep_peak_mb']:,.0f} MB",
    ]
    for trial, auc in r["sweep_val_mean_auc"].items():
        alone = r["alone_val_mean_auc"].get(trial)
        beside = f"; alone {alone:.4f} ({auc - alone:+.4f})" if alone is not None else ""
        lines.append(f"  {trial:<28} val mean AUC {auc:.4f}, {r['sweep_epochs'][trial]} epochs{beside}")
    return "\n".join(lines)
