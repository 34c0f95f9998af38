"""Runs against the first named, on the same images: per disease the AUC difference with a paired
patient-bootstrap interval and p-value, Holm-adjusted across the labels, and the mean; a forest plot.

Why the paired bootstrap rather than DeLong's test: it is the resampling every interval of the project
already uses (patients, not images, as the unit), it gives the mean AUC difference its interval from the
same resamples, and it needs no variance formula adapted to clustered images.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from results.metrics import compare_scores, holm


def compare_runs(y_true, scores: dict, *, groups, label_names: Sequence[str], n_boot: int, seed: int) -> dict:
    """Every run after the first against the first (scores: run name -> (N, L) on the same images)."""
    names = list(scores)
    against = names[0]
    versus = {}
    for name in names[1:]:
        result = compare_scores(
            y_true,
            scores[name],
            scores[against],
            groups=groups,
            label_names=label_names,
            n_boot=n_boot,
            seed=seed,
        )
        adjusted = holm(
            [entry["p"] if entry["p"] is not None else np.nan for entry in result["labels"].values()]
        )
        for entry, p in zip(result["labels"].values(), adjusted, strict=True):
            entry["p_holm"] = None if np.isnan(p) else float(p)
        versus[name] = result
    return {
        "against": against,
        "images": int(len(y_true)),
        "patients": int(np.unique(groups).size),
        "method": "paired patient bootstrap (percentile interval, shifted-null p-value), Holm across labels",
        "versus": versus,
    }


def _cell(entry: dict) -> str:
    if entry["difference"] is None:
        return "undefined"
    low, high = entry["ci"]
    interval = "" if low is None else f" [{low:+.4f}, {high:+.4f}]"
    return f"{entry['difference']:+.4f}{interval}"


def _p(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def format_comparison(result: dict, *, split: str) -> str:
    """Markdown: per run, one row per disease (difference, interval, p, Holm p) and the mean."""
    lines = [f"**{notice}**" for notice in result.get("notices", [])]
    lines += [
        f"# {', '.join(result['versus'])} vs {result['against']}",
        "",
        f"ROC AUC of each run minus {result['against']}'s on the same {result['images']} {split} images "
        f"({result['patients']} patients); {result['method']}. A difference whose interval excludes 0 and "
        "whose Holm p is below 0.05 is beyond noise.",
    ]
    for name, versus in result["versus"].items():
        lines += [
            "",
            f"## {name} − {result['against']}",
            "",
            "| label | difference [95% CI] | p | p (Holm) |",
        ]
        lines.append("| --- | --- | --- | --- |")
        for label, entry in versus["labels"].items():
            lines.append(f"| {label} | {_cell(entry)} | {_p(entry['p'])} | {_p(entry.get('p_holm'))} |")
        mean = versus["mean"]
        lines.append(f"| **mean** | {_cell(mean)} | {_p(mean['p'])} | |")
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict, path: Path, *, label_names: Sequence[str]) -> Path:
    """A forest plot: per disease and for the mean, each run's difference to the against with its interval."""
    rows = [*label_names, "mean"]
    figure = Figure(figsize=(7, 0.35 * len(rows) + 1.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    runs = list(result["versus"])
    for k, name in enumerate(runs):
        versus = result["versus"][name]
        entries = [versus["labels"][label] for label in label_names] + [versus["mean"]]
        y = np.arange(len(rows)) + (k - (len(runs) - 1) / 2) * 0.25
        for position, entry in zip(y, entries, strict=True):
            if entry["difference"] is None:
                continue
            low, high = entry["ci"]
            error = None if low is None else [[entry["difference"] - low], [high - entry["difference"]]]
            axes.errorbar(
                entry["difference"],
                position,
                xerr=error,
                fmt="o",
                color=f"C{k}",
                capsize=2,
                label=name if position == y[0] else None,
            )
    axes.axvline(0.0, color="grey", linewidth=0.8)
    axes.set_yticks(np.arange(len(rows)), rows)
    axes.invert_yaxis()
    axes.set_xlabel(f"ROC AUC difference to {result['against']} (95% paired patient bootstrap)")
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)
