"""Every file of a trained and scored run, written into its temporary folder: config.json, the model, its
history, predictions, auc.md and plots, the decisions fitted on validation, and metrics.json last (a
folder holding it is a finished run)."""

import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from cache.store import write_projection
from heads.data import HeadData
from heads.run_folder import projection_path, read_decisions, write_decisions, write_json
from heads.scoring import ScoredHead
from results.calibration import apply_calibration
from results.record import read_results, write_results
from results.report import plot_auc_comparison, plot_reliability, plot_roc, write_auc_table


def write_run(
    run_dir: Path,
    *,
    model: keras.Model,
    history: pd.DataFrame,
    scored: ScoredHead,
    data: HeadData,
    label_names: list[str],
    snapshot: dict,
    clock: dict,
    plots: bool = True,
) -> None:
    """Every file of the run; metrics.json last, with the seconds each step took (`clock`: perf_counter
    times of the run's "start", "fitted" and "scored")."""
    write_json(run_dir / "config.json", snapshot)
    for name, projection in data.projections.items():  # new images' tokens are projected alike
        write_projection(projection_path(run_dir, name), projection)
    model.save(run_dir / "model.keras")
    history.to_csv(run_dir / "history.csv", index=False)
    _write_outputs(run_dir, scored=scored, data=data, label_names=label_names)
    write_decisions(run_dir, scored.decisions)
    if plots:
        _plot(run_dir, scored=scored, data=data, label_names=label_names)
    scored.metrics["seconds"] = _seconds(clock)
    write_results(run_dir / "metrics.json", scored.metrics)


def _write_outputs(run_dir: Path, *, scored: ScoredHead, data: HeadData, label_names: list[str]) -> None:
    """predictions.csv and auc.md. A run scored on val (a sweep trial) keeps only val rows' predictions:
    the test split stays sealed."""
    metrics, scores = scored.metrics, scored.scores
    shown = data.rows("val") if metrics["split"] == "val" else np.arange(len(data.names))
    predictions = pd.DataFrame(scores[shown], columns=label_names)
    predictions.insert(0, "split", data.split[shown])
    predictions.insert(0, "name", data.names[shown])
    predictions.to_csv(run_dir / "predictions.csv", index=False, float_format="%.6f")
    # run_dir is the temporary folder: the run's own name is in the metrics.
    write_auc_table(metrics, run_dir / "auc.md", label_names=label_names, run_name=metrics["run"])


def _plot(run_dir: Path, *, scored: ScoredHead, data: HeadData, label_names: list[str]) -> None:
    """roc.png, auc.png and calibration.png, on the split the run was scored on."""
    metrics, scores = scored.metrics, scored.scores
    evaluated = data.rows(metrics["split"])
    plot_roc(
        data.labels[evaluated],
        scores[evaluated],
        run_dir / "roc.png",
        label_names=label_names,
        notice=metrics.get("notice", ""),
        run_name=metrics["run"],
        split=metrics["split"],
    )
    plot_auc_comparison(metrics, run_dir / "auc.png", label_names=label_names)
    raw = scores[evaluated]
    calibration = scored.decisions["calibration"]
    plot_reliability(
        data.labels[evaluated],
        raw,
        apply_calibration(calibration, raw, label_names=label_names),
        run_dir / "calibration.png",
        bins=calibration["bins"],
        method=calibration["method"],
        notice=metrics.get("notice", ""),
    )


def plot_finished_run(run_dir: Path, *, data: HeadData, label_names: list[str]) -> None:
    """roc.png, auc.png and calibration.png of a run written without them (a sweep's trials), drawn from
    its files: predictions.csv, metrics.json and the decisions. Its folder holds the rows it was scored
    on (a trial: validation only)."""
    run_dir = Path(run_dir)
    metrics = read_results(run_dir / "metrics.json").as_dict()
    table = pd.read_csv(run_dir / "predictions.csv").set_index("name")
    evaluated = data.rows(metrics["split"])
    scores = np.full((len(data.names), len(label_names)), np.nan, dtype=np.float32)
    scores[evaluated] = table.loc[data.names[evaluated], list(label_names)].to_numpy(np.float32)
    scored = ScoredHead(scores=scores, decisions=read_decisions(run_dir), metrics=metrics)
    _plot(run_dir, scored=scored, data=data, label_names=label_names)


def _seconds(clock: dict) -> dict:
    now = time.perf_counter()
    return {
        "train": round(clock["fitted"] - clock["start"], 2),
        "evaluate": round(clock["scored"] - clock["fitted"], 2),
        "write": round(now - clock["scored"], 2),
        "total": round(now - clock["start"], 2),
    }
