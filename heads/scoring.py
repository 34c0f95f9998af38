"""A trained head on cached rows: its probabilities, and its metrics on a split beside the baselines,
with the calibration and operating points fitted on validation."""

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from cxr14.caveats import run_notice
from cxr14.errors import InputError
from heads.data import HeadData, head_inputs
from heads.run_folder import load_model, read_decisions, run_labels, write_decisions, write_json
from results.baselines import CHANCE_AUC, baseline_metrics, metadata_baseline_scores
from results.calibration import apply_calibration, fit_calibration
from results.metrics import expected_calibration_error, label_metrics, mean_defined, rates_at_thresholds
from results.multilabel import multilabel_metrics
from results.operating import choose_thresholds, threshold_array
from results.record import write_results
from results.report import plot_reliability
from results.settings import DecisionConfig

PREDICT_BATCH = 4096


def predict_probabilities(model: keras.Model, data: HeadData, rows: np.ndarray) -> np.ndarray:
    """(len(rows), L) float32 probabilities from the plain (view 0) features."""
    return predict_arrays(model, head_inputs(model, data, rows), n=len(rows))


def predict_arrays(model: keras.Model, inputs: dict, *, n: int) -> np.ndarray:
    """Probabilities for already gathered inputs, in chunks; predict_on_batch skips fit-style data
    pipelines, which cost more than the head itself on a validation set each epoch."""
    chunks = [
        model.predict_on_batch({k: v[start : start + PREDICT_BATCH] for k, v in inputs.items()})
        for start in range(0, n, PREDICT_BATCH)
    ]
    if not chunks:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return np.concatenate([np.asarray(c, dtype=np.float32) for c in chunks])


def check_labels(data: HeadData, label_names) -> None:
    """Refuse label names that are not the data's label columns, in order.

    The config may list a subset of the labels in any order; a run evaluated under another list would
    otherwise score each disease's probabilities against another disease's column.
    """
    label_names = list(label_names)
    columns = list(data.label_names) or [f"{data.labels.shape[1]} columns"]
    if data.labels.shape[1] != len(label_names) or (data.label_names and columns != label_names):
        raise InputError(
            f"the run's labels {label_names} are not the index's label columns {columns}; "
            "set [data] labels to the run's own (its config.json) and load the index again"
        )


def data_notice(data: HeadData) -> str:
    """The notice every output of a run on `data` carries (synthetic data, pre-training on ChestX-ray14)."""
    return run_notice(synthetic=data.synthetic, seen=data.seen_chestxray14)


def split_metrics(
    data: HeadData,
    scores: np.ndarray,
    *,
    split: str,
    label_names,
    n_boot: int,
    seed: int,
    decisions: dict | None = None,
    baseline: np.ndarray | None = None,
) -> dict:
    """Metrics (results.metrics.label_metrics) of probabilities `scores` for the rows of `split`, in row
    order, beside the metadata baseline and chance, and at the run's `decisions` (fit_decisions) if any.
    `baseline`: metadata_baseline(data, split) when the caller has it (a sweep's runs share it)."""
    rows = data.rows(split)
    if rows.size == 0:
        raise InputError(f"the {split} split has no images with features; check the split lists and caches")
    check_labels(data, label_names)
    if scores.shape != (rows.size, len(label_names)):
        raise InputError(
            f"the head gives {scores.shape[1]} probabilities per image but the run lists "
            f"{len(label_names)} labels; use the labels the run was trained with"
        )
    y, groups = data.labels[rows], data.patients[rows]
    metrics = label_metrics(y, scores, groups=groups, label_names=label_names, n_boot=n_boot, seed=seed)
    metrics |= {"split": split, "split_source": data.split_source, "synthetic": data.synthetic}
    metrics["seen_chestxray14"] = list(data.seen_chestxray14)
    if notice := data_notice(data):
        metrics["notice"] = notice
    if baseline is None:
        baseline = metadata_baseline(data, split)
    metrics["baselines"] = _baselines(
        data, scores, baseline, rows=rows, label_names=label_names, n_boot=n_boot, seed=seed
    )
    if decisions is not None:
        metrics |= decision_metrics(
            y,
            scores,
            groups=groups,
            decisions=decisions,
            split=split,
            label_names=label_names,
            n_boot=n_boot,
            seed=seed,
        )
    return metrics


def metadata_baseline(data: HeadData, split: str) -> np.ndarray | None:
    """The metadata baseline fitted on train, its probabilities on the rows of `split`; None without
    metadata or training rows."""
    if data.covariates is None or data.rows("train").size == 0:
        return None
    return metadata_baseline_scores(
        data.covariates, data.labels, train_rows=data.rows("train"), rows=data.rows(split)
    )


def _baselines(
    data: HeadData, scores: np.ndarray, baseline, *, rows, label_names, n_boot: int, seed: int
) -> dict:
    """The metadata baseline's metrics beside the run's on `rows`, and chance (results/baselines.py)."""
    if baseline is None:
        return {
            "metadata": None,
            "chance_auc": CHANCE_AUC,
            "run_minus_metadata": None,
            "beats_metadata": None,
        }
    return baseline_metrics(
        data.labels[rows],
        scores,
        baseline,
        groups=data.patients[rows],
        label_names=label_names,
        n_boot=n_boot,
        seed=seed,
    )


def fit_decisions(data: HeadData, scores: np.ndarray, *, settings: DecisionConfig, label_names) -> dict:
    """Calibration, then thresholds on the calibrated probabilities, both fitted on the val rows of
    `scores` (every row of `data`, in order); the test split never takes part."""
    val = data.rows("val")
    calibration = fit_calibration(
        data.labels[val],
        scores[val],
        method=settings.calibration,
        label_names=label_names,
        bins=settings.bins,
    )
    calibrated = apply_calibration(calibration, scores[val], label_names=label_names)
    thresholds = choose_thresholds(
        data.labels[val],
        calibrated,
        method=settings.operating_point,
        target=settings.target,
        label_names=label_names,
    )
    if notice := data_notice(data):
        calibration["notice"] = thresholds["notice"] = notice
    return {"calibration": calibration, "thresholds": thresholds}


def decision_metrics(
    y_true, scores, *, groups, decisions: dict, split: str, label_names, n_boot: int, seed: int
) -> dict:
    """ECE before and after calibration, and the rates at the operating points, on one split's rows."""
    calibration, thresholds = decisions["calibration"], decisions["thresholds"]
    calibrated = apply_calibration(calibration, scores, label_names=label_names)
    bins = int((calibration or {}).get("bins", DecisionConfig().bins))
    before = expected_calibration_error(y_true, scores, bins=bins)
    after = expected_calibration_error(y_true, calibrated, bins=bins)
    # Fitted on val and measured on val (a sweep trial) flatters both: say so in the numbers' own record.
    in_sample = split == "val"
    result = {
        "calibration": {
            "method": (calibration or {}).get("method", "none"),
            "fitted_on": "val",
            "in_sample": in_sample,
            "bins": bins,
            "ece_before": mean_defined(before),
            "ece_after": mean_defined(after),
            "labels": {
                name: {"ece_before": float(before[j]), "ece_after": float(after[j])}
                for j, name in enumerate(label_names)
            },
        }
    }
    if thresholds is not None:
        cuts = threshold_array(thresholds, label_names=label_names)
        boot = {"groups": groups, "label_names": label_names, "n_boot": n_boot, "seed": seed}
        point = {
            "method": thresholds["method"],
            "target": thresholds["target"],
            "chosen_on": "val",
            "in_sample": in_sample,
        }
        result["operating_points"] = {
            **point,
            "labels": rates_at_thresholds(y_true, calibrated, cuts, **boot),
        }
        # The same calls, judged across labels; the ranking metrics rank the calibrated probabilities,
        # which calibration puts on one scale across labels.
        result["multilabel"] = {
            "operating_point": point,
            "ranking_scores": "calibrated probability",
            **multilabel_metrics(y_true, calibrated, cuts, **boot),
        }
    return result


def score_expert(
    *, run_dir: Path, data: HeadData, split: str, expert_files: list[Path], n_boot: int, seed: int
) -> dict:
    """A run against Google's expert labels on the images of `split` they cover, beside the NIH labels
    of the same images (results/expert.py); also written to evaluate-expert-SPLIT.json."""
    from results.expert import expert_metrics, read_expert

    run_dir = Path(run_dir)
    labels = run_labels(run_dir)
    check_labels(data, labels)
    expert = read_expert(expert_files)
    rows = data.rows(split)
    result = expert_metrics(
        expert=expert,
        names=data.names[rows],
        nih_labels=data.labels[rows],
        scores=predict_probabilities(load_model(run_dir), data, rows),
        patients=data.patients[rows],
        label_names=labels,
        n_boot=n_boot,
        seed=seed,
    )
    result = {"run": run_dir.name, "split": split, "files": [str(p) for p in expert_files], **result}
    if notice := data_notice(data):
        result["notice"] = notice
    write_json(run_dir / f"evaluate-expert-{split}.json", result)
    return result


def score_run(
    *, run_dir: Path, data: HeadData, split: str = "test", n_boot: int, seed: int, keep_predictions=False
) -> dict:
    """A run's metrics on `split`, recomputed from its model.keras; also written to evaluate-SPLIT.json.
    `keep_predictions`: also write the probabilities to predictions-SPLIT.csv (a sweep's winner, whose
    predictions.csv holds validation only), so that report and compare can pair it with other runs."""
    run_dir = Path(run_dir)
    labels = run_labels(run_dir)
    rows = data.rows(split)
    scores = predict_probabilities(load_model(run_dir), data, rows)
    if keep_predictions:
        table = pd.DataFrame(scores, columns=labels)
        table.insert(0, "split", split)
        table.insert(0, "name", data.names[rows])
        table.to_csv(run_dir / f"predictions-{split}.csv", index=False, float_format="%.6f")
    metrics = split_metrics(
        data,
        scores,
        split=split,
        label_names=labels,
        n_boot=n_boot,
        seed=seed,
        decisions=read_decisions(run_dir),
    )
    metrics = {**metrics, "run": run_dir.name, "excluded": data.excluded}
    write_results(evaluation_path(run_dir, split), metrics)
    return metrics


def write_decision_outputs(
    run_dir: Path,
    *,
    decisions: dict,
    data,
    scores: np.ndarray,
    metrics: dict,
    label_names: Sequence[str],
    plot: bool = True,
) -> None:
    """calibration.json, thresholds.json and calibration.png (on the split the run was scored on; not
    without `plot`)."""
    write_decisions(run_dir, decisions)
    if not plot:
        return
    rows = data.rows(metrics["split"])
    raw = scores[rows]
    calibration = decisions["calibration"]
    plot_reliability(
        data.labels[rows],
        raw,
        apply_calibration(calibration, raw, label_names=label_names),
        Path(run_dir) / "calibration.png",
        bins=calibration["bins"],
        method=calibration["method"],
        notice=metrics.get("notice", ""),
    )


def evaluation_path(run_dir: Path, split: str) -> Path:
    """Where score_run writes a run's metrics on `split`."""
    return Path(run_dir) / f"evaluate-{split}.json"
