"""A trained head on cached rows: its probabilities, and its metrics on a split beside the baselines and
its probe start, with the calibration and operating points fitted on validation; beside them, what its
fit's history says about the run (run_facts)."""

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from cache.stream import chunk_rows
from cxr14.caveats import run_notice
from cxr14.errors import InputError
from heads.data import HeadData, check_labels, head_inputs
from heads.run_folder import load_model, read_decisions, run_labels, write_json
from heads.settings import HeadConfig, TrainConfig, kind_of
from heads.start import HeadStart, probe_blocks
from results.baselines import CHANCE_AUC, baseline_metrics, metadata_baseline_scores
from results.calibration import apply_calibration, fit_calibration
from results.metrics import (
    bootstrap_difference,
    expected_calibration_error,
    label_metrics,
    mean_defined,
    rates_at_thresholds,
    roc_auc_per_label,
)
from results.multilabel import multilabel_metrics
from results.operating import choose_thresholds, threshold_array
from results.record import write_results
from results.settings import DecisionConfig

PREDICT_BATCH = 4096  # the most rows predicted at a time (predict_rows: fewer for wide token maps)
# The validation mean ROC AUC each epoch is judged by: its key in the training logs and a history column.
MONITOR = "val_mean_auc"


def predict_probabilities(model: keras.Model, data: HeadData, rows: np.ndarray) -> np.ndarray:
    """(len(rows), L) float32 probabilities from the plain (view 0) features."""
    return predict_arrays(model, head_inputs(model, data, rows), n=len(rows))


def predict_arrays(model: keras.Model, inputs: dict, *, n: int) -> np.ndarray:
    """Probabilities for already gathered inputs, in chunks; predict_on_batch skips fit-style data
    pipelines, which cost more than the head itself on a validation set each epoch."""
    step = predict_rows(inputs)
    chunks = [
        model.predict_on_batch({k: v[start : start + step] for k, v in inputs.items()})
        for start in range(0, n, step)
    ]
    if not chunks:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return np.concatenate([np.asarray(c, dtype=np.float32) for c in chunks])


def predict_rows(inputs: dict) -> int:
    """Rows predicted at a time: PREDICT_BATCH, fewer where an input's rows as float32 (what the head
    computes in) would pass cache.stream.chunk_rows' bytes or a fifth of a streamed cache's budget."""
    return min([PREDICT_BATCH, *(chunk_rows(v, itemsize=4) for v in inputs.values())])


@dataclass(frozen=True)
class ScoredHead:
    """Every row's probabilities, the calibration and thresholds fitted on validation, and the metrics."""

    scores: np.ndarray
    decisions: dict
    metrics: dict


def score(
    data: HeadData,
    *,
    model: keras.Model,
    begin: HeadStart | None,
    rows: dict,
    eval_split: str,
    label_names: list[str],
    train: TrainConfig,
    decision: DecisionConfig,
    baseline: np.ndarray | None = None,
) -> ScoredHead:
    """Probabilities of every row; calibration and operating points fitted on validation; the metrics of
    `eval_split` beside the baselines and, for a feature head (`begin`: its probe start), the ridge probe.

    A run scored on val (a sweep trial) uses and keeps its val rows only, so only those are predicted (the
    others are NaN): the other 90 % of the rows took ~3 s of each trial's scoring at full size.
    `baseline`: the metadata baseline on `eval_split` (metadata_baseline), when the caller has it."""
    everything = np.arange(len(data.names))
    needed = rows["val"] if eval_split == "val" else everything
    scores = np.full((len(data.names), len(label_names)), np.nan, dtype=np.float32)
    scores[needed] = predict_probabilities(model, data, needed)
    evaluated = rows[eval_split]
    decisions = fit_decisions(data, scores, settings=decision, label_names=label_names)
    boot = {"n_boot": train.bootstrap, "seed": train.seed}
    metrics = split_metrics(
        data,
        scores[evaluated],
        split=eval_split,
        label_names=label_names,
        decisions=decisions,
        baseline=baseline,
        **boot,
    )
    if begin is not None:
        metrics["reference"] = reference_metrics(
            data, begin, rows=evaluated, head_scores=scores[evaluated], label_names=label_names, **boot
        )
    return ScoredHead(scores=scores, decisions=decisions, metrics=metrics)


def reference_metrics(
    data: HeadData,
    begin: HeadStart,
    *,
    rows: np.ndarray,
    head_scores: np.ndarray,
    label_names,
    n_boot: int,
    seed: int,
) -> dict:
    """The ridge probe's AUCs on the evaluated rows, and the head's mean AUC minus the probe's with a
    paired patient-bootstrap interval: whether the head adds anything beyond a linear probe."""
    # The probe's blocks of the scored rows alone: a token cache's are pooled from those rows only.
    probe_scores = begin.probe.scores(list(probe_blocks(data, rows).values()), np.arange(len(rows)))
    labels, patients = data.labels[rows], data.patients[rows]
    aucs = roc_auc_per_label(labels, probe_scores)
    difference = bootstrap_difference(
        labels, head_scores, probe_scores, groups=patients, n_boot=n_boot, seed=seed
    )
    return {
        "name": "ridge probe",
        "penalty": begin.probe.penalty,
        "val_mean_auc": begin.probe.val_mean_auc,
        "mean_auc": mean_defined(aucs),
        "labels": {
            name: (None if np.isnan(a) else float(a)) for name, a in zip(label_names, aucs, strict=True)
        },
        "difference": difference["difference"],
        "difference_ci": difference["ci"],
        "directions": int(begin.directions.shape[1]),
    }


def run_facts(
    run_dir: Path,
    *,
    data: HeadData,
    head: HeadConfig,
    rows: dict,
    history: pd.DataFrame,
    train: TrainConfig,
    begin: HeadStart | None = None,
) -> dict:
    """What metrics.json says about the run beside its scores: its training, from the fit's history."""
    epochs = train.epochs
    from_probe = kind_of(head).takes == "features" and train.start == "probe"
    directions = begin is not None and begin.directions.shape[1] > 0  # units beside the probe at the start
    # Never NaN: training_rows makes sure some label has both classes in val, and NaN scores raise.
    best = int(np.flatnonzero(history["chosen"].to_numpy())[0])
    highest = int(history[MONITOR].to_numpy().argmax())
    trained = len(history) - 1
    selection = history.attrs.get("selection") or {}
    return {
        "run": run_dir.name,
        "head": head.kind,
        "backbones": list(data.features),
        "val_mean_auc": float(history[MONITOR].iloc[best]),
        "epochs": trained,
        "best_epoch": int(history["epoch"].iloc[best]),
        # The best epoch is the last of the most allowed: validation was still improving when it stopped.
        "converged": not (trained == epochs and highest == trained and trained > 0),
        # The start kept over a later epoch whose validation gain was within the noise (BestEpoch).
        **({"selection": selection} if selection else {}),
        **({"start": train.start} if kind_of(head).takes == "features" else {}),
        # The head is its probe start: no epoch kept beyond it (results.format.probe_note says it in words).
        "kept_start": bool(from_probe and int(history["epoch"].iloc[best]) == 0),
        "kept_probe": bool(from_probe and int(history["epoch"].iloc[best]) == 0 and not directions),
        "warnings": history.attrs.get("warnings", []),
        "rows": {split: int(r.size) for split, r in rows.items()},
        "excluded": data.excluded,
    }


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


def evaluation_path(run_dir: Path, split: str) -> Path:
    """Where score_run writes a run's metrics on `split`."""
    return Path(run_dir) / f"evaluate-{split}.json"
