"""The leaderboard over finished runs, best first (like cs230's synthesize_results): one row per run folder,
read from its metrics.json (or evaluate-SPLIT.json) and config.json; a sweep folder stands for its winner.
Every row is scored on the one split the header names, with its difference to the best run."""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr14.caveats import SEEN_NOTICE, SYNTHETIC_NOTICE
from cxr14.errors import InputError
from heads.run_folder import find_reported  # noqa: F401  (report's runs, found without numpy)
from heads.settings import describe_settings
from results.format import MISSING, format_auc, format_difference, probe_note
from results.record import RunResults, read_results
from results.report import versus_metadata


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(
            f"{path}: no {what}; train the run with run.py train-head (or run.py evaluate on it)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error}); re-run run.py evaluate on the run") from error


class NotOnSplit(Exception):
    """A run folder that cannot take part in a leaderboard of this split; the message says why."""


def _read_split(run_dir: Path, split: str) -> RunResults:
    """The run's results on `split`: metrics.json when it was scored there, else evaluate-SPLIT.json."""
    results = read_results(run_dir / "metrics.json")
    if results.split == split:
        return results
    evaluated = run_dir / f"evaluate-{split}.json"
    if not evaluated.is_file():
        raise NotOnSplit(f"scored on {results.split} only (run.py evaluate --split {split} scores it)")
    return read_results(evaluated)


def _entry(folder: Path) -> tuple[Path, str]:
    """(run folder, shown name): a sweep folder stands for its winner."""
    if (folder / "metrics.json").is_file() or not (folder / "grid.toml").is_file():
        return folder, folder.name
    summary = folder / "sweep.json"
    if not summary.is_file():
        raise NotOnSplit("a sweep that has not finished (no sweep.json): run the sweep again to resume it")
    winner = _read_json(summary, "sweep.json")["winner"]
    return folder / winner, f"{folder.name}/{winner} (sweep winner)"


def _auc_cell(results: RunResults, name: str) -> str:
    return format_auc(results.labels[name].auc) if name in results.labels else MISSING


def _leaderboard_row(run_dir: Path, label_names, *, name: str, split: str) -> tuple[RunResults, list[str]]:
    results = _read_split(run_dir, split)
    config = _read_json(run_dir / "config.json", "config.json")
    synthetic = bool(results.details.get("synthetic"))
    seen = ", pre-trained on ChestX-ray14" if results.details.get("seen_chestxray14") else ""
    row = [
        name,
        format_auc(results.mean_auc, results.mean_ci),
        str(config.get("head", {}).get("kind", "?")),
        "+".join(config.get("backbones", [])),
        ", ".join(describe_settings(config.get("head", {}), config.get("train", {}))),
        _difference_cell(results.details.get("reference")) + _kept_mark(results.details),
        versus_metadata(results.details),
        f"{results.split} ({results.images}{', synthetic' if synthetic else ''}{seen})",
    ]
    row += [_auc_cell(results, label) for label in label_names or results.labels]
    return results, row


def _kept_mark(details: dict) -> str:
    """Beside the difference to the probe: that the head is its probe start, in words."""
    return f" ({probe_note(details).split(':')[0]})" if probe_note(details) else ""


def _difference_cell(probe: dict | None) -> str:
    if not probe:
        return MISSING
    return format_difference(probe.get("difference"), probe.get("difference_ci"))


def leaderboard(run_dirs: Sequence[Path], *, split: str = "test", index=None) -> str:
    """Markdown table of runs scored on `split`, best mean AUC first: interval, difference to the best run
    with a paired patient-bootstrap interval and a tie mark (needs `index`, the data set's labels and
    patients), head, backbones, options, the differences to the ridge probe and to the metadata baseline,
    AUC per disease; folders that cannot take part are listed below with why."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise InputError("no runs to report: train one with run.py train-head, or name run folders")
    scored, left_out, label_names = [], [], None
    for folder in run_dirs:
        try:
            run_dir, name = _entry(folder)
            results, row = _leaderboard_row(run_dir, label_names, name=name, split=split)
        except NotOnSplit as why:
            left_out.append(f"- {folder.name}: {why}")
            continue
        label_names = label_names or list(results.labels)
        scored.append((results, row, run_dir))
    if not scored:
        raise InputError(f"no run scored on {split} to report:\n" + "\n".join(left_out))
    # Runs without a mean AUC go last rather than being dropped.
    scored.sort(key=lambda item: -item[0].sort_key)
    verdicts = _versus_best([run_dir for *_, run_dir in scored], split=split, index=index)
    return _format_board(scored, verdicts, label_names=label_names, split=split, left_out=left_out)


def _versus_best(run_dirs: list[Path], *, split: str, index) -> list[str]:
    """The verdict cell of each run (best first): its mean AUC minus the best's on the same images."""
    from experiments.compare import read_predictions
    from experiments.sweep import verdict_cell
    from results.metrics import mean_differences_against

    if index is None:
        return ["best", *["—"] * (len(run_dirs) - 1)]
    try:
        names, _, best = read_predictions(run_dirs[0], split=split)
    except InputError:
        return ["best", *["no predictions to pair"] * (len(run_dirs) - 1)]
    rows = index.rows(names)
    cells, scores = {}, {}
    for k, run_dir in enumerate(run_dirs[1:], 1):
        try:
            other_names, _, other = read_predictions(run_dir, split=split)
        except InputError:
            cells[k] = "no predictions to pair"
            continue
        if not np.array_equal(other_names, names):
            cells[k] = f"other {split} images"
            continue
        scores[k] = other
    n_boot, seed = _bootstrap_of(run_dirs[0])
    found = mean_differences_against(
        index.labels[rows], scores, best, groups=index.patients[rows], n_boot=n_boot, seed=seed
    )
    for k, verdict in found.items():
        high = verdict["ci"][1]
        cells[k] = verdict_cell({**verdict, "tied": high is None or high >= 0.0}, best=False)
    return ["best", *[cells[k] for k in range(1, len(run_dirs))]]


def _bootstrap_of(run_dir: Path) -> tuple[int, int]:
    train = _read_json(run_dir / "config.json", "config.json").get("train", {})
    return int(train.get("bootstrap", 1000)), int(train.get("seed", 0))


def _format_board(scored, verdicts, *, label_names, split: str, left_out: list[str]) -> str:
    header = ["#", "run", "mean AUC [95% CI]", f"vs best ({split}) [95% CI]", "head", "backbones", "options"]
    header += ["vs ridge probe", "vs metadata baseline", "split (images)", *label_names]
    lines = []
    if any(results.details.get("synthetic") for results, *_ in scored):
        lines += [
            f"**{SYNTHETIC_NOTICE}**: runs marked synthetic were trained and scored on drawn chests.",
            "",
        ]
    if any(results.details.get("seen_chestxray14") for results, *_ in scored):
        lines += [f"**{SEEN_NOTICE}**: runs marked pre-trained on ChestX-ray14.", ""]
    lines += [
        f"Ranked by **{split}** mean ROC AUC; \"vs best\" is a run's mean AUC minus the best's on the same "
        f"{split} images, with a 95% paired patient-bootstrap interval; **tied**: it reaches 0.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * len(header)) + " |",
    ]
    for rank, ((_, row, _), verdict) in enumerate(zip(scored, verdicts, strict=True), start=1):
        lines.append("| " + " | ".join([str(rank), row[0], row[1], verdict, *row[2:]]) + " |")
    if left_out:
        lines += ["", f"Not in this leaderboard (not scored on {split}):", *left_out]
    return "\n".join(lines) + "\n"
