"""The leaderboard over finished runs, best first (like cs230's synthesize_results): one row per run folder,
read from its metrics.json and config.json."""

import json
import math
from collections.abc import Sequence
from pathlib import Path

from cxr14.caveats import SYNTHETIC_NOTICE
from cxr14.errors import InputError
from heads.settings import describe_settings
from results.format import MISSING, UNDEFINED, as_float, format_auc, format_number
from results.report import test_metrics, versus_metadata


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(
            f"{path}: no {what}; train the run with run.py train-head (or run.py evaluate on it)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error}); re-run run.py evaluate on the run") from error


def _read_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    return test_metrics(_read_json(path, "metrics.json"), source=str(path))


def _auc_cell(results: dict, name: str) -> str:
    if name not in results:
        return MISSING
    return UNDEFINED if results[name]["auc"] is None else format_number(results[name]["auc"])


def _leaderboard_row(run_dir: Path, label_names: Sequence[str]) -> tuple[float, list[str], bool]:
    metrics = _read_metrics(run_dir)
    config = _read_json(run_dir / "config.json", "config.json")
    backbones = config.get("backbones", [])
    results = metrics["labels"]
    synthetic = bool(metrics.get("synthetic"))
    row = [
        run_dir.name,
        format_auc(metrics["mean_auc"], metrics["mean_ci"]),
        str(config.get("head", {}).get("kind", "?")),
        "+".join(backbones),
        ", ".join(describe_settings(config.get("head", {}), config.get("train", {}))),
        _difference_cell(metrics.get("reference")),
        versus_metadata(metrics),
        f"{metrics.get('split', 'test')} ({metrics['images']}{', synthetic' if synthetic else ''})",
    ]
    row += [_auc_cell(results, name) for name in label_names]
    return as_float(metrics["mean_auc"]), row, synthetic


def _difference_cell(probe: dict | None) -> str:
    if not probe or probe.get("difference") is None:
        return MISSING
    low, high = probe["difference_ci"]
    return f"{probe['difference']:+.3f}" + ("" if low is None else f" [{low:+.3f}, {high:+.3f}]")


def leaderboard(run_dirs: Sequence[Path]) -> str:
    """Markdown table of runs, best mean AUC first: interval, head, backbones, options, the differences to
    the ridge probe and to the metadata baseline, AUC per disease; headed by the synthetic notice when any
    run is synthetic."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise InputError("no runs to report: train one with run.py train-head, or name run folders")
    label_names = list(_read_metrics(run_dirs[0])["labels"])
    scored = [_leaderboard_row(d, label_names) for d in run_dirs]
    # Runs without a mean AUC go last rather than being dropped.
    scored.sort(key=lambda item: (math.isnan(item[0]), -item[0] if not math.isnan(item[0]) else 0.0))
    header = ["#", "run", "mean AUC [95% CI]", "head", "backbones", "options", "vs ridge probe"]
    header += ["vs metadata baseline", "split (images)", *label_names]
    lines = []
    if any(synthetic for *_, synthetic in scored):
        lines += [
            f"**{SYNTHETIC_NOTICE}**: runs marked synthetic were trained and scored on drawn chests.",
            "",
        ]
    lines += ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    for rank, (_, row, _) in enumerate(scored, start=1):
        lines.append("| " + " | ".join([str(rank), *row]) + " |")
    return "\n".join(lines) + "\n"
