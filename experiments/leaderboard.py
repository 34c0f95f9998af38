"""The leaderboard over finished runs, best first (like cs230's synthesize_results): one row per run folder,
read from its metrics.json and config.json."""

import json
from collections.abc import Sequence
from pathlib import Path

from cxr14.caveats import SEEN_NOTICE, SYNTHETIC_NOTICE
from cxr14.errors import InputError
from heads.settings import describe_settings
from results.format import MISSING, format_auc, format_difference
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


def _auc_cell(results: RunResults, name: str) -> str:
    return format_auc(results.labels[name].auc) if name in results.labels else MISSING


def _leaderboard_row(run_dir: Path, label_names: Sequence[str]) -> tuple[float, list[str], bool, bool]:
    results = read_results(run_dir / "metrics.json")
    config = _read_json(run_dir / "config.json", "config.json")
    synthetic = bool(results.details.get("synthetic"))
    seen = ", pre-trained on ChestX-ray14" if results.details.get("seen_chestxray14") else ""
    row = [
        run_dir.name,
        format_auc(results.mean_auc, results.mean_ci),
        str(config.get("head", {}).get("kind", "?")),
        "+".join(config.get("backbones", [])),
        ", ".join(describe_settings(config.get("head", {}), config.get("train", {}))),
        _difference_cell(results.details.get("reference")),
        versus_metadata(results.details),
        f"{results.split} ({results.images}{', synthetic' if synthetic else ''}{seen})",
    ]
    row += [_auc_cell(results, name) for name in label_names]
    return results.sort_key, row, synthetic, bool(seen)


def _difference_cell(probe: dict | None) -> str:
    if not probe:
        return MISSING
    return format_difference(probe.get("difference"), probe.get("difference_ci"))


def leaderboard(run_dirs: Sequence[Path]) -> str:
    """Markdown table of runs, best mean AUC first: interval, head, backbones, options, the differences to
    the ridge probe and to the metadata baseline, AUC per disease; headed by the synthetic notice when any
    run is synthetic."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise InputError("no runs to report: train one with run.py train-head, or name run folders")
    label_names = list(read_results(run_dirs[0] / "metrics.json").labels)
    scored = [_leaderboard_row(d, label_names) for d in run_dirs]
    # Runs without a mean AUC go last rather than being dropped.
    scored.sort(key=lambda item: -item[0])
    header = ["#", "run", "mean AUC [95% CI]", "head", "backbones", "options", "vs ridge probe"]
    header += ["vs metadata baseline", "split (images)", *label_names]
    lines = []
    if any(synthetic for _, _, synthetic, _ in scored):
        lines += [
            f"**{SYNTHETIC_NOTICE}**: runs marked synthetic were trained and scored on drawn chests.",
            "",
        ]
    if any(seen for *_, seen in scored):
        lines += [f"**{SEEN_NOTICE}**: runs marked pre-trained on ChestX-ray14.", ""]
    lines += ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    for rank, (_, row, *_) in enumerate(scored, start=1):
        lines.append("| " + " | ".join([str(rank), *row]) + " |")
    return "\n".join(lines) + "\n"
