"""What a run shows people: the AUC table beside published numbers, and the ROC, comparison and
reliability plots.

Plots draw on a matplotlib Figure with the Agg canvas directly, so nothing touches pyplot's global state.
"""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from sklearn.metrics import auc, roc_curve

from cxr14.caveats import SYNTHETIC_NOTICE, seen_notice
from cxr14.errors import InputError
from cxr14.text import probability
from results.format import (
    MISSING,
    UNDEFINED,
    as_float,
    format_auc,
    format_difference,
    format_number,
    probe_note,
)
from results.metrics import RATES, mean_defined, reliability_curve
from results.published import load_published
from results.record import MULTILABEL_METRICS


def test_metrics(metrics: dict, *, source: str = "metrics") -> dict:
    """The label_metrics() dict held at the top level of metrics.json."""
    if "labels" in metrics:
        return metrics
    raise InputError(f"{source}: no per-label results ('labels'); re-run run.py evaluate on the run")


def _published_mean(paper: dict, label_names: Sequence[str]) -> float:
    return mean_defined([paper["auc"].get(name, math.nan) for name in label_names])


def _split_lines(metrics: dict, published: dict, run_name: str) -> list[str]:
    split = metrics.get("split", "test")
    source = f" from the {metrics['split_source']} splits" if metrics.get("split_source") else ""
    if metrics.get("synthetic"):
        source = f" of a {metrics['split_source']}"
    boot = metrics.get("n_boot")
    interval = f"; 95% interval from {boot} bootstrap resamples of patients" if boot else ""
    lines = [
        f"* **{run_name}**: the {split} split{source} ({metrics['images']} images, "
        f"{metrics['patients']} patients){interval}."
    ]
    lines += [
        f"* **{paper['title']}**: {paper['split']}. {paper['citation']}." for paper in published.values()
    ]
    return lines


def _published_for(metrics: dict) -> dict:
    """Published columns to set beside a run: none for a synthetic run, which is not comparable."""
    return {} if metrics.get("synthetic") else load_published()


def _baseline_cell(metrics: dict, name: str | None = None) -> str:
    metadata = (metrics.get("baselines") or {}).get("metadata")
    if not metadata:
        return MISSING
    if name is None:
        return format_auc(metadata["mean_auc"], metadata["mean_ci"])
    return format_number(metadata["labels"][name]["auc"])


def _auc_rows(
    metrics: dict, published: dict, *, label_names: Sequence[str], run_name: str
) -> list[list[str]]:
    probe = metrics.get("reference")
    header = ["Disease", "Positives", f"{run_name} AUC [95% CI]", "PR AUC"]
    header += ["ridge probe (same features)"] if probe else []
    header += ["Metadata baseline"]
    header += [paper["title"] for paper in published.values()]
    rows = [header, ["---", "---:"] + ["---:"] * (len(header) - 2)]
    for name in label_names:
        result = metrics["labels"][name]
        row = [
            name,
            str(result["positives"]),
            format_auc(result["auc"], result["ci"]),
            format_number(result["pr_auc"]),
        ]
        row += [format_number(probe["labels"].get(name))] if probe else []
        row += [_baseline_cell(metrics, name)]
        rows.append(row + [format_number(paper["auc"].get(name)) for paper in published.values()])
    # Published means over the same labels as the run's mean, so the bottom row compares like with like.
    in_mean = [name for name in label_names if metrics["labels"][name]["auc"] is not None]
    mean = format_auc(metrics["mean_auc"], metrics["mean_ci"])
    rows.append(
        [f"**Mean** ({len(in_mean)} labels)", "", f"**{mean}**", format_number(metrics.get("mean_pr_auc"))]
        + ([format_number(probe["mean_auc"])] if probe else [])
        + [_baseline_cell(metrics)]
        + [format_number(_published_mean(paper, in_mean)) for paper in published.values()]
    )
    return rows


def _baseline_lines(metrics: dict) -> list[str]:
    """What the run must beat, and whether it does."""
    baselines = metrics.get("baselines") or {}
    if not baselines.get("metadata"):
        return []
    chance = baselines["chance_auc"]
    difference = baselines["run_minus_metadata"]
    lines = [
        "",
        f"Baselines on the same images: a **metadata-only** logistic regression (age, sex, view position; "
        f"fitted on train) reaches mean AUC {_baseline_cell(metrics)}; chance is {chance:.3f}. This run minus "
        f"the metadata baseline: {format_difference(difference['difference'], difference['ci'])} (paired patient bootstrap).",
    ]
    if not baselines["beats_metadata"]:
        lines += [
            "",
            "**⚠ This run does not beat the metadata-only baseline**: the interval of the difference reaches "
            "0, so nothing here shows that the images add to age, sex and view position.",
        ]
    return lines


def _operating_lines(metrics: dict, *, label_names: Sequence[str]) -> list[str]:
    """The operating-point table: each label's threshold and its rates on this split."""
    points, calibration = metrics.get("operating_points"), metrics.get("calibration")
    if not points:
        return []
    how = "Youden's J" if points["method"] == "youden" else f"{points['method']} ≥ {points['target']:g}"
    measured = metrics.get("split", "test")
    caveat = " (chosen and measured on the same split: optimistic)" if points.get("in_sample") else ""
    lines = [
        "",
        f"## Operating points: chosen on validation ({how}), measured on {measured}{caveat}",
        "",
        "A calibrated probability at or above the threshold is a positive call.",
        "",
        "| Disease | Threshold | Sensitivity [95% CI] | Specificity [95% CI] | PPV [95% CI] | NPV [95% CI] "
        "| ECE before → after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in label_names:
        point = points["labels"][name]
        cells = [format_auc(point[rate]["value"], point[rate]["ci"]) for rate in RATES]
        ece = calibration["labels"][name] if calibration else None
        gap = f"{ece['ece_before']:.3f} → {ece['ece_after']:.3f}" if ece else MISSING
        threshold = point["threshold"]
        shown = MISSING if threshold is None or math.isnan(threshold) else probability(threshold)
        lines.append(f"| {name} | {shown} | " + " | ".join([*cells, gap]) + " |")
    if calibration:
        lines += [
            "",
            f"Calibration ({calibration['method']}, fitted on validation): mean expected calibration error on "
            f"{measured} {calibration['ece_before']:.3f} before, {calibration['ece_after']:.3f} after "
            f"({calibration['bins']} bins); reliability diagram in calibration.png.",
        ]
    return lines


def _multilabel_lines(metrics: dict) -> list[str]:
    """Multi-label metrics of the same calls (results/multilabel.py), each with its interval."""
    block = metrics.get("multilabel")
    if not block:
        return []
    point, left_out = block["operating_point"], ", ".join(block["without_threshold"])
    lines = [
        "",
        "## Multi-label metrics at the operating points",
        "",
        f"The calls above ({point['method']}, chosen on {point['chosen_on']}) on {block['images']} images and "
        f"{len(block['labels'])} labels"
        + (f" (no threshold, left out: {left_out})" if left_out else "")
        + ". "
        f"F1 counts 0 where it divides by zero: {block['empty_images']} images with no finding and no call. "
        f"The ranking metrics order each image's labels by {block['ranking_scores']}, on the "
        f"{block['images_with_findings']} images with a finding.",
        "",
        "| Metric | Value [95% CI] |",
        "| --- | ---: |",
    ]
    for name, (title, better) in MULTILABEL_METRICS.items():
        estimate = block["metrics"][name]
        lines.append(f"| {title} ({better} is better) | {format_auc(estimate['value'], estimate['ci'])} |")
    return lines


def write_auc_table(metrics: dict, path, *, label_names: Sequence[str], run_name: str) -> Path:
    """auc.md: this run's AUC per disease (with its interval) beside the metadata baseline and, on real
    data, the published columns; then the operating points. A synthetic run says so on its first line."""
    metrics = test_metrics(metrics)
    published = _published_for(metrics)
    lines = []
    if metrics.get("synthetic"):
        lines += [
            f"**{SYNTHETIC_NOTICE}.** Trained and scored on drawn chests made by `make-sample`; published "
            "numbers are left out.",
            "",
        ]
    lines += _seen_lines(metrics)
    lines += [f"# ROC AUC per disease: {run_name}", ""]
    rows = _auc_rows(metrics, published, label_names=label_names, run_name=run_name)
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if metrics.get("reference"):
        lines += ["", probe_line(metrics["reference"])]
    if probe_note(metrics):
        lines += ["", f"**This head {probe_note(metrics)}.** Its outputs are the probe's."]
    lines += _baseline_lines(metrics)
    title = "Splits (AUCs from different splits are not strictly comparable):" if published else "Split:"
    lines += ["", title, ""]
    lines += _split_lines(metrics, published, run_name)
    undefined = [name for name in label_names if metrics["labels"][name]["auc"] is None]
    if undefined:
        lines += [
            "",
            f"Undefined in this split (only one class present, so no AUC; left out of the mean): "
            f"{', '.join(undefined)}.",
        ]
    lines += _operating_lines(metrics, label_names=label_names)
    lines += _multilabel_lines(metrics)
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _seen_lines(metrics: dict) -> list[str]:
    """auc.md's opening caveat for features whose pre-training saw ChestX-ray14 images."""
    seen = metrics.get("seen_chestxray14")
    if not seen:
        return []
    return [
        f"**{seen_notice(seen)}.** Their pre-training saw ChestX-ray14 images, likely this test split's "
        "among them; the published columns come from models that never saw them.",
        "",
    ]


def probe_line(probe: dict) -> str:
    """What the head adds beyond a linear probe on the same features, with its paired interval."""
    difference = format_difference(probe["difference"], probe["difference_ci"])
    return (
        f"Head minus the ridge probe on the same features and rows (penalty {probe['penalty']:.2g} x n_train, "
        f"chosen on validation): **{difference}** mean ROC AUC (95% paired "
        "patient bootstrap). An interval above 0 means the head adds something a linear probe cannot."
    )


def _save(figure: Figure, path) -> Path:
    """The figure as a PNG whose Title metadata is its axes' title, so tools (and tests) can read it."""
    path = Path(path)
    FigureCanvasAgg(figure)
    title = " / ".join(axes.get_title() for axes in figure.axes if axes.get_title())
    figure.savefig(path, dpi=120, bbox_inches="tight", metadata={"Title": title.replace("\n", " / ")})
    return path


def _titled(text: str, notice: str) -> str:
    return f"{notice}\n{text}" if notice else text


# 14 curves that stay apart: each label its own colour, and line styles in turn, so neighbours differ twice.
ROC_COLORS = (
    "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
    "tab:gray", "tab:olive", "tab:cyan", "black", "gold", "navy", "lightcoral",
)  # fmt: skip
ROC_STYLES = ("-", "--", "-.", ":")
# Sides of the zoomed top-left corner (false positive rate from 0, true positive rate up to 1) to pick from.
ROC_CORNERS = (0.02, 0.05, 0.1, 0.2, 0.5)


def roc_style(j: int) -> dict:
    """Colour and line style of the j-th label's curve."""
    return {"color": ROC_COLORS[j % len(ROC_COLORS)], "linestyle": ROC_STYLES[j % len(ROC_STYLES)]}


def plot_roc(
    y_true,
    y_score,
    path,
    *,
    label_names: Sequence[str],
    notice: str = "",
    run_name: str = "",
    split: str = "",
) -> Path:
    """roc.png: one ROC curve per label, titled with the run and split, beside the top-left corner zoomed
    in, where good curves crowd; the legend is ordered by AUC. A label with one class is listed as
    undefined, not drawn. `notice` (the synthetic-sample notice) heads the title."""
    figure = roc_figure(
        y_true, y_score, label_names=label_names, notice=notice, run_name=run_name, split=split
    )
    return _save(figure, path)


def roc_figure(
    y_true, y_score, *, label_names: Sequence[str], notice: str = "", run_name: str = "", split: str = ""
) -> Figure:
    """The figure plot_roc saves: the whole ROC square (axes 0) and its top-left corner (axes 1)."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    figure = Figure(figsize=(13, 6.2))
    whole, corner = figure.subplots(1, 2)
    aucs = {}
    for j, name in enumerate(label_names):
        aucs[name] = _draw_roc(whole, corner, y_true[:, j], y_score[:, j], name=name, style=roc_style(j))
    side = roc_corner([a for a in aucs.values() if a is not None])
    whole.plot([0, 1], [0, 1], color="0.6", linewidth=0.8, linestyle=":")
    whole.add_patch(Rectangle((0, 1 - side), side, side, fill=False, edgecolor="0.4", linewidth=0.8))
    whole.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate")
    corner.set(xlim=(0, side), ylim=(1 - side, 1 + side / 100), xlabel="False positive rate")
    corner.set_title(f"top-left corner (boxed), {1 / side:g}x")
    what = ", ".join(part for part in (run_name, f"{split} split" if split else "") if part)
    title = f"ROC per disease: {what}" if what else "ROC per disease"
    whole.set_title(_titled(f"{title} ({y_true.shape[0]:,} images)", notice))
    # Best first, undefined last: the legend reads as a ranking, and crowded curves are found by rank.
    order = sorted(range(len(label_names)), key=lambda j: -(aucs[label_names[j]] or -1.0))
    handles = whole.get_lines()[: len(label_names)]
    corner.legend(
        [handles[j] for j in order],
        [handles[j].get_label() for j in order],
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=7,
        title="label (ROC AUC), best first",
        title_fontsize=8,
        handlelength=3.5,
    )
    return figure


def _draw_roc(whole, corner, y_true, y_score, *, name: str, style: dict) -> float | None:
    """One label's curve on both axes; its AUC, or None (drawn as an empty legend entry) for one class."""
    positives = int(y_true.sum())
    if positives in (0, y_true.size):
        whole.plot([], [], color=style["color"], linestyle=":", label=f"{name} ({UNDEFINED}: one class)")
        return None
    fpr, tpr, _ = roc_curve(y_true, y_score)
    area = float(auc(fpr, tpr))
    for axes in (whole, corner):
        axes.plot(fpr, tpr, linewidth=1.4, label=f"{name} ({probability(area)})", **style)
    return area


def roc_corner(aucs: Sequence[float]) -> float:
    """Side of the corner to zoom on: about three times the median label's distance from a perfect AUC."""
    if not aucs:
        return ROC_CORNERS[-1]
    wanted = 3 * (1 - float(np.median(aucs)))
    return next((side for side in ROC_CORNERS if side >= wanted), ROC_CORNERS[-1])


PROBE_OFFSET = 0.22  # the probe's marker sits this far below the run's, so that equal AUCs stay apart


def _plot_published(axes, published: dict, *, label_names: Sequence[str], positions: np.ndarray) -> None:
    for k, paper in enumerate(published.values()):
        values = [paper["auc"].get(name, math.nan) for name in label_names]
        marker = "osD^v"[k % 5]
        axes.plot(values, positions, marker, color=f"C{k + 1}", markersize=5, alpha=0.8, label=paper["title"])


def _plot_baseline(axes, metrics: dict, *, label_names: Sequence[str], positions: np.ndarray) -> None:
    metadata = (metrics.get("baselines") or {}).get("metadata")
    if metadata:
        values = [as_float(metadata["labels"][name]["auc"]) for name in label_names]
        axes.plot(values, positions, "x", color="0.35", markersize=6, label="metadata baseline")


def _plot_probe(axes, metrics: dict, *, label_names: Sequence[str], positions: np.ndarray) -> float:
    """The ridge probe on the same features (the run's reference), just below the run's own marker; the
    lowest value drawn, or NaN without a probe."""
    probe = metrics.get("reference")
    if not probe:
        return math.nan
    values = np.array([as_float(probe["labels"].get(name)) for name in label_names])
    mean = format_number(as_float(probe.get("mean_auc")))
    axes.plot(
        values,
        positions - PROBE_OFFSET,
        "D",
        color="tab:green",
        markerfacecolor="none",
        markersize=6,
        label=f"ridge probe, same features (mean {mean})",
    )
    return float(np.nanmin(values)) if np.isfinite(values).any() else math.nan


def _plot_run(
    axes, metrics: dict, *, label_names: Sequence[str], positions: np.ndarray, run_name: str
) -> float:
    """The run's AUCs with interval bars; returns the lowest value drawn, to set the axis."""
    aucs = np.array([as_float(metrics["labels"][n]["auc"]) for n in label_names])
    cis = np.array([[as_float(v) for v in metrics["labels"][n]["ci"] or (None, None)] for n in label_names])
    errors = np.abs(np.nan_to_num(cis - aucs[:, None]).T)
    axes.errorbar(
        aucs, positions, xerr=errors, fmt="o", color="black", markersize=6, capsize=3, label=run_name
    )
    for position, value in zip(positions, aucs, strict=True):
        if math.isnan(value):
            axes.text(0.51, position, UNDEFINED, va="center", fontsize=8, color="black")
    drawn = np.r_[aucs, cis.ravel()]
    return float(np.nanmin(drawn)) if np.isfinite(drawn).any() else 0.5


def plot_auc_comparison(
    metrics: dict, path, *, label_names: Sequence[str], run_name: str | None = None
) -> Path:
    """auc.png: this run's AUC per disease with its interval, beside the ridge probe on the same features
    (where the run has one), the metadata baseline, chance and (on real data only) each published source.

    run_name defaults to metrics["run"] when the metrics carry it.
    """
    return _save(auc_figure(metrics, label_names=label_names, run_name=run_name), path)


def auc_figure(metrics: dict, *, label_names: Sequence[str], run_name: str | None = None) -> Figure:
    """The figure plot_auc_comparison saves."""
    metrics = test_metrics(metrics)
    run_name = run_name or metrics.get("run") or "this run"
    positions = np.arange(len(label_names))[::-1]
    figure = Figure(figsize=(8, 0.45 * len(label_names) + 1.8))
    axes = figure.add_subplot()
    published = _published_for(metrics)
    _plot_published(axes, published, label_names=label_names, positions=positions)
    _plot_baseline(axes, metrics, label_names=label_names, positions=positions)
    lowest = _plot_run(axes, metrics, label_names=label_names, positions=positions, run_name=run_name)
    lowest = np.nanmin([lowest, _plot_probe(axes, metrics, label_names=label_names, positions=positions)])
    axes.axvline(0.5, color="0.6", linewidth=0.8, linestyle=":", label="chance")
    axes.set_yticks(positions, labels=list(label_names))
    # A poor run (or an interval reaching below chance) stays on the axes rather than cut off, and so does
    # a marker at 1.0 (a perfect AUC), which an axis ending at 1.0 would cut in half.
    axes.set_xlim(min(0.45, lowest - 0.02), 1.02)
    axes.set_xticks([t for t in axes.get_xticks() if t <= 1.0])
    axes.set_xlabel("ROC AUC")
    beside = "beside published" if published else "beside the metadata baseline"
    title = f"{run_name}: mean ROC AUC {format_number(as_float(metrics['mean_auc']))} {beside}"
    axes.set_title(_titled(title, metrics.get("notice", "")))
    axes.legend(loc="lower left", fontsize=7, bbox_to_anchor=(1.01, 0.0))
    axes.grid(axis="x", linewidth=0.3)
    return figure


def plot_reliability(y_true, raw, calibrated, path, *, bins: int, method: str, notice: str = "") -> Path:
    """calibration.png: the reliability diagram, every label pooled, before and after calibration, over
    the scores each bin holds (bars, numbers written on them): a point made of few scores means little."""
    return _save(reliability_figure(y_true, raw, calibrated, bins=bins, method=method, notice=notice), path)


def reliability_figure(y_true, raw, calibrated, *, bins: int, method: str, notice: str = "") -> Figure:
    """The figure plot_reliability saves: the diagram (axes 0) and the scores per bin (axes 1)."""
    figure = Figure(figsize=(6.5, 8.5))
    diagram, counts = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1.2))
    diagram.plot([0, 1], [0, 1], color="0.6", linewidth=0.8, linestyle=":", label="perfectly calibrated")
    width = 0.4 / bins
    for k, (scores, label, style) in enumerate(
        ((raw, "before", "o--"), (calibrated, f"after ({method})", "s-"))
    ):
        curve = reliability_curve(y_true, scores, bins=bins)
        drawn = curve["count"] > 0
        (line,) = diagram.plot(
            curve["mean_probability"][drawn], curve["positive_share"][drawn], style, label=label
        )
        centres = (np.arange(bins) + 0.5) / bins + (k - 0.5) * width
        bars = counts.bar(centres, curve["count"], width=width, color=line.get_color(), label=label, log=True)
        counts.bar_label(
            bars, labels=[f"{n:,}" if n else "" for n in curve["count"]], fontsize=6, rotation=90, padding=2
        )
    diagram.set(xlim=(0, 1), ylim=(0, 1), ylabel="Share positive")
    images = np.asarray(y_true).shape[0]
    diagram.set_title(_titled(f"Reliability, all labels pooled ({images} images, {bins} bins)", notice))
    diagram.legend(loc="upper left", fontsize=8)
    counts.set(xlabel="Mean predicted probability (bins of equal width)", ylabel="Scores in the bin")
    counts.set_ylim(0.8, counts.get_ylim()[1] * 8)  # room for the numbers above the tallest bar
    return figure


def versus_metadata(metrics: dict) -> str:
    """The run's mean AUC minus the metadata baseline's, flagged when the run does not beat it."""
    baselines = metrics.get("baselines") or {}
    difference = (baselines.get("run_minus_metadata") or {}).get("difference")
    if difference is None:
        return MISSING
    return format_difference(difference) + ("" if baselines["beats_metadata"] else " ⚠ not above")
