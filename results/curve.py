"""A learning curve's results: test mean AUC against labelled training images for each line (a head on
its backbones), the spread over seeds, a fitted power law AUC(n) = a - b n^-c and the images it predicts
for 95 % of its plateau; the table (curve.md) and the plot (curve.png)."""

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from results.baselines import CHANCE_AUC
from results.format import MISSING, format_auc, format_number
from results.report import _titled

# The plateau share the fit is asked about: 95 % of the way from chance to the fitted plateau a. Measured
# from chance, not from 0, as a head at chance has learned nothing (0.95 a would be ~0.76 for a = 0.8).
PLATEAU_SHARE = 0.95
MIN_FIT_SIZES = 3  # a - b n^-c has three parameters


def summarize_points(points: Sequence[dict]) -> list[dict]:
    """One row per line and size: the seeds' points gathered (means, the seeds' spread, total time)."""
    groups: dict[tuple, list[dict]] = {}
    for point in points:
        groups.setdefault((point["line"], point["size"]), []).append(point)
    return [_gather(line, size, seeds) for (line, size), seeds in groups.items()]


def _gather(line: str, size: str, seeds: list[dict]) -> dict:
    aucs = np.array([_nan(p["test_mean_auc"]) for p in seeds])
    lows = [_nan(p["test_mean_ci"][0]) for p in seeds]
    highs = [_nan(p["test_mean_ci"][1]) for p in seeds]
    labels = seeds[0]["positives"]
    return {
        "line": line,
        "size": size,
        "seeds": [p["seed"] for p in seeds],
        "images": round(float(np.mean([p["images"] for p in seeds]))),
        "images_range": [min(p["images"] for p in seeds), max(p["images"] for p in seeds)],
        "patients": round(float(np.mean([p["patients"] for p in seeds]))),
        "positives_fewest": {name: min(p["positives"][name] for p in seeds) for name in labels},
        # Per label, how many of the seeds' subsets held no positive of it (trained on, not crashed on).
        "without_positives": _without_positives(seeds),
        "test_mean_auc": _json(np.nanmean(aucs)) if np.isfinite(aucs).any() else None,
        # The patient-bootstrap interval of each seed's test mean AUC, its ends averaged over the seeds.
        "test_mean_ci": [_json(_mean(lows)), _json(_mean(highs))],
        "seed_sd": _json(np.nanstd(aucs, ddof=1)) if np.isfinite(aucs).sum() > 1 else None,
        "seed_range": [_json(np.nanmin(aucs)), _json(np.nanmax(aucs))] if np.isfinite(aucs).any() else None,
        "seconds": round(sum(p["seconds"] for p in seeds), 1),
    }


def _without_positives(seeds: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for point in seeds:
        for name in point["no_positives"]:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _json(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def power_law(n, a: float, b: float, c: float):
    """AUC(n) = a - b n^-c: a is the plateau, c how fast it is approached."""
    return a - b * np.power(np.asarray(n, dtype=np.float64), -c)


def fit_power_law(images: Sequence[float], aucs: Sequence[float]) -> dict:
    """a, b, c fitted by least squares (scipy.optimize.curve_fit), and the images the fit predicts for
    PLATEAU_SHARE of its plateau; {"error": why} when there is too little to fit or the fit fails."""
    from scipy.optimize import curve_fit

    n, y = np.asarray(images, np.float64), np.asarray(aucs, np.float64)
    keep = np.isfinite(y)
    n, y = n[keep], y[keep]
    if len(np.unique(n)) < MIN_FIT_SIZES:
        return {"error": f"needs test mean AUCs at {MIN_FIT_SIZES} or more sizes, has {len(np.unique(n))}"}
    a0 = min(1.0, float(y.max()) + 0.02)
    b0 = max(1e-3, (a0 - float(y[np.argmin(n)])) * math.sqrt(float(n.min())))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an ill-conditioned covariance is reported as the fit is
            (a, b, c), _ = curve_fit(
                power_law, n, y, p0=(a0, b0, 0.5), bounds=([0.0, 0.0, 1e-3], [1.0, np.inf, 3.0]), maxfev=20000
            )
    except (RuntimeError, ValueError) as err:
        return {"error": f"the power law did not fit: {err}"}
    residual = float(np.sqrt(np.mean((power_law(n, a, b, c) - y) ** 2)))
    fit = {"a": float(a), "b": float(b), "c": float(c), "rms_residual": residual, "sizes": int(len(n))}
    return fit | plateau_images(a=float(a), b=float(b), c=float(c), largest=float(n.max()))


def plateau_images(*, a: float, b: float, c: float, largest: float) -> dict:
    """The images n where a - b n^-c = chance + PLATEAU_SHARE (a - chance), and whether that lies beyond
    the largest size measured (an extrapolation of the fit, not a measurement)."""
    gap = (1.0 - PLATEAU_SHARE) * (a - CHANCE_AUC)
    if gap <= 0:
        return {"plateau_images": None, "plateau_note": "the fitted plateau is at or below chance"}
    if b <= gap:  # already there at one image: b n^-c <= b
        return {"plateau_images": 1.0, "extrapolated": False}
    images = (b / gap) ** (1.0 / c)
    return {"plateau_images": float(images), "extrapolated": bool(images > largest)}


def curve_lines(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """The summary rows of each line, by images."""
    lines: dict[str, list[dict]] = {}
    for row in rows:
        lines.setdefault(row["line"], []).append(row)
    return {line: sorted(found, key=lambda r: r["images"]) for line, found in lines.items()}


def format_fit(fit: dict) -> str:
    """One line for people; the plateau's images marked as what the fit predicts."""
    if "error" in fit:
        return f"no power law: {fit['error']}"
    text = (
        f"AUC(n) = {fit['a']:.3f} − {fit['b']:.3g}·n^−{fit['c']:.3f} (rms residual {fit['rms_residual']:.4f})"
    )
    if fit.get("plateau_images") is None:
        return f"{text}; {fit['plateau_note']}"
    where = (
        "an extrapolation beyond the images measured" if fit["extrapolated"] else "within the sizes measured"
    )
    share = round(PLATEAU_SHARE * 100)
    return f"{text}; {share} % of the way from chance to the plateau at ~{fit['plateau_images']:,.0f} images ({where})"


def format_curve(curve: dict) -> str:
    """curve.md: per line a row per size, then the fits and the baselines."""
    lines = [f"**{curve['notice']}**", ""] if curve.get("notice") else []
    lines += [
        f"# Learning curve {curve['name']}",
        "",
        f"Each point: a head trained on a patient-wise subset of the training split ({curve['order']}), "
        "chosen on the full validation split, scored on the full test split. AUC: the mean over seeds of "
        "the test mean ROC AUC; interval: each seed's 95 % patient-bootstrap interval, its ends averaged; "
        "seed sd: the spread of the seeds' test mean AUC.",
        "",
        "| line | size | images | patients | test mean AUC [95% CI] | seed sd | seeds | labels without positives | time |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for line, rows in curve_lines(curve["summary"]).items():
        lines += [_table_row(line, row) for row in rows]
    lines += ["", "Power law per line, fitted to the mean AUCs (a prediction of the fit, not a measurement):"]
    lines += [f"- **{line}**: {format_fit(fit)}" for line, fit in curve["fits"].items()]
    baseline = curve.get("metadata_baseline") or {}
    lines += [
        "",
        f"Metadata-only baseline (age, sex, view position; fitted on the full training split): test mean AUC "
        f"{format_auc(baseline.get('mean_auc'))}. Chance: {curve['chance_auc']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def _table_row(line: str, row: dict) -> str:
    low, high = row["images_range"]
    images = f"{row['images']:,}" if low == high else f"{row['images']:,} ({low:,}–{high:,})"
    missing = ", ".join(f"{name} ×{n}" for name, n in row["without_positives"].items()) or "none"
    sd = MISSING if row["seed_sd"] is None else format_number(row["seed_sd"], 4)
    return (
        f"| {line} | {row['size']} | {images} | {row['patients']:,} | "
        f"{format_auc(row['test_mean_auc'], row['test_mean_ci'])} | {sd} | {len(row['seeds'])} | {missing} | "
        f"{row['seconds']:.0f} s |"
    )


def plot_curve(curve: dict, path: Path) -> None:
    """curve.png: mean AUC against labelled images (log axis), a band per line, its fit dashed, the
    metadata baseline and chance."""
    figure = Figure(figsize=(8, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for k, (line, rows) in enumerate(curve_lines(curve["summary"]).items()):
        color = f"C{k % 10}"
        n = np.array([r["images"] for r in rows], np.float64)
        y = np.array([_nan(r["test_mean_auc"]) for r in rows])
        low = np.array([_nan(r["test_mean_ci"][0]) for r in rows])
        high = np.array([_nan(r["test_mean_ci"][1]) for r in rows])
        axes.plot(n, y, "o-", color=color, label=line)
        axes.fill_between(n, low, high, color=color, alpha=0.2, linewidth=0)
        fit = curve["fits"].get(line, {})
        if "error" not in fit:
            grid = np.geomspace(n.min(), n.max() * 3, 100)
            axes.plot(grid, power_law(grid, fit["a"], fit["b"], fit["c"]), "--", color=color, linewidth=1,
                      label=f"{line}: fit, plateau {fit['a']:.3f}")  # fmt: skip
    baseline = (curve.get("metadata_baseline") or {}).get("mean_auc")
    if baseline is not None:
        axes.axhline(baseline, color="gray", linestyle="-.", linewidth=1, label="metadata-only baseline")
    axes.axhline(curve["chance_auc"], color="black", linestyle=":", linewidth=1, label="chance")
    axes.set_xscale("log")
    axes.set_xlabel("labelled training images (log scale)")
    axes.set_ylabel("test mean ROC AUC (band: 95% patient-bootstrap CI)")
    axes.set_title(_titled(f"Learning curve {curve['name']}", curve.get("notice", "")), fontsize=10)
    axes.grid(linewidth=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
