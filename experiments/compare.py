"""run.py compare: runs scored on the same images, each against the first named, from their predictions.csv."""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.errors import InputError
from experiments.config import Config


def read_predictions(run_dir: Path, *, split: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(image names, label columns, (N, L) probabilities) of a run's predictions.csv on `split`."""
    import pandas as pd

    path = Path(run_dir) / "predictions.csv"
    if (Path(run_dir) / f"predictions-{split}.csv").is_file():  # a sweep's winner, scored on test after
        path = Path(run_dir) / f"predictions-{split}.csv"
    if not path.is_file():
        raise InputError(f"{path}: no predictions.csv; train the run with run.py train-head")
    table = pd.read_csv(path)
    if not {"name", "split"} <= set(table.columns):
        raise InputError(f"{path}: needs the columns name and split; train the run again")
    table = table[table["split"] == split]
    if table.empty:
        held = ", ".join(sorted(set(pd.read_csv(path)["split"]))) or "none"
        raise InputError(
            f"{path}: no {split} predictions (it holds: {held}); sweep trials keep validation only: "
            "compare them with --split val"
        )
    labels = [c for c in table.columns if c not in ("name", "split")]
    order = np.argsort(table["name"].to_numpy())
    return table["name"].to_numpy()[order], labels, table[labels].to_numpy(np.float64)[order]


def check_same_images(runs: dict, *, split: str) -> None:
    """Refuse runs whose split holds other images, or other label columns, than the first named."""
    (first, (names, labels, _)), *others = runs.items()
    for run, (other_names, other_labels, _) in others:
        if other_labels != labels:
            raise InputError(
                f"{run} predicts labels {other_labels}, {first} predicts {labels}: not comparable"
            )
        # Hashed, not sorted: np.setdiff1d sorts the name strings, seconds at ChestX-ray14's test size.
        only_first = np.asarray(names)[~pd.Index(names).isin(other_names)]
        only_other = np.asarray(other_names)[~pd.Index(other_names).isin(names)]
        if only_first.size or only_other.size:
            example = (only_first if only_first.size else only_other)[0]
            raise InputError(
                f"{run} and {first} were not scored on the same {split} images: {only_first.size} only in "
                f"{first}, {only_other.size} only in {run} (e.g. {example}); compare runs trained on one "
                "data set and split"
            )


def run_compare(
    config: Config, *, run_dirs: Sequence[Path], split: str, out: Path | None, n_boot: int, seed: int
) -> dict:
    """compare.json, compare.md and compare.png in `out` (default runs/compare-A-vs-B...); the result."""
    from experiments.data import open_config_dataset
    from results.compare import compare_runs, format_comparison, plot_comparison

    if len(run_dirs) < 2:
        raise InputError("compare needs two or more runs: run.py compare RUN RUN [RUN ...]")
    runs = {_run_name(Path(d), config.runs_dir): read_predictions(Path(d), split=split) for d in run_dirs}
    if len(runs) < len(run_dirs):
        raise InputError(f"a run is named twice in {[str(d) for d in run_dirs]}; name each once")
    check_same_images(runs, split=split)
    names, labels, _ = next(iter(runs.values()))
    index = open_config_dataset(config).index
    rows = index.rows(names)
    if list(index.label_names) != labels:
        raise InputError(f"the runs predict {labels}, but the index's labels are {list(index.label_names)}")
    result = compare_runs(
        index.labels[rows],
        {run: scores for run, (_, _, scores) in runs.items()},
        groups=index.patients[rows],
        label_names=labels,
        n_boot=n_boot,
        seed=seed,
    )
    result["split"] = split
    # Each run's own caveats (a synthetic sample, features pre-trained on ChestX-ray14) travel with it.
    result["notices"] = sorted({n for d in run_dirs if (n := _notice(Path(d)))})
    out = (
        Path(out) if out else config.runs_dir / ("compare-" + "-vs-".join(n.replace("/", "_") for n in runs))
    )
    out.mkdir(parents=True, exist_ok=True)
    text = format_comparison(result, split=split)
    (out / "compare.md").write_text(text, encoding="utf-8")
    (out / "compare.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot_comparison(result, out / "compare.png", label_names=labels)
    return {**result, "written": str(out), "summary": text + f"\nwritten to {out}"}


def _notice(run_dir: Path) -> str:
    from results.record import read_results

    path = run_dir / "metrics.json"
    return str(read_results(path).details.get("notice") or "") if path.is_file() else ""


def _run_name(run_dir: Path, runs_dir: Path) -> str:
    """SWEEP/TRIAL for a sweep trial, the folder name otherwise."""
    try:
        return run_dir.resolve().relative_to(Path(runs_dir).resolve()).as_posix()
    except ValueError:
        return run_dir.name
