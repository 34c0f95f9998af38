"""Train one head on cached features, keep the best epoch by validation mean ROC AUC, write runs/RUN/."""

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from keras import ops

from cxr14.errors import InputError
from heads.custom import keep_head_code
from heads.data import HeadData, head_inputs
from heads.losses import make_loss
from heads.models import METADATA_INPUT, build_head
from heads.progress import EpochProgress
from heads.run_folder import claim_run, finish_run, write_json
from heads.scoring import (
    check_labels,
    fit_decisions,
    predict_arrays,
    predict_probabilities,
    split_metrics,
    write_decision_outputs,
)
from heads.settings import HeadConfig, TrainConfig, kind_of, start_directions
from heads.start import HeadStart, fit_start, probe_blocks
from heads.stream import ROW_IDS, check_streamable, stream_batches, stream_model_inputs, streamed_inputs
from results.format import KEPT_PROBE, KEPT_START, format_difference
from results.metrics import bootstrap_difference, mean_defined, roc_auc_per_label
from results.record import write_results
from results.report import plot_auc_comparison, plot_roc, write_auc_table
from results.settings import DecisionConfig

MONITOR = "val_mean_auc"


class BestEpoch(keras.callbacks.Callback):
    """Scores the head on validation before training (epoch 0) and after every epoch, keeps the weights of
    the best epoch, and stops after `patience` epochs without a gain of at least `min_delta`.

    The score is the mean over labels of scikit-learn's ROC AUC: Keras' own AUC metric bins scores (off by
    0.067 on the rarest label here) and averages multi-hot labels wrongly. Epoch 0 counts because a feature
    head starts at the probe; min_delta keeps one noisy rare label from extending a run that has stopped
    gaining (measured: mean validation AUC moves by ~1e-4 between plateaued epochs).

    With `keep_start` (a head that starts at the probe), the best epoch replaces the start only where its
    validation gain over it is more than noise: the lower end of a paired patient-bootstrap interval
    (one-sided 95 %, Bonferroni over the epochs trained) above zero. On a small validation split the best
    of many epochs wins by chance
    otherwise (on a 90-image split, fc kept an epoch 0.014 worse than the probe on test).
    """

    def __init__(
        self,
        *,
        head: keras.Model,
        data: HeadData,
        rows: np.ndarray,
        patience: int,
        min_delta: float,
        keep_start: bool = False,
        seed: int = 0,
        kept_note: str = KEPT_PROBE,
        inputs: dict | None = None,
    ):
        super().__init__()
        self.head, self.patience, self.min_delta = head, patience, min_delta
        self.kept_note = kept_note  # what the summary calls a start kept: the probe, or more
        # Gathered once, not every epoch; heads trained together share one gathered copy (`inputs`).
        self.inputs = head_inputs(head, data, rows) if inputs is None else inputs
        self.labels, self.patients = data.labels[rows], data.patients[rows]
        self.keep_start, self.seed = keep_start, seed
        self.scores: list[float] = []
        self.selection: dict = {}

    def validation_scores(self) -> np.ndarray:
        return predict_arrays(self.head, self.inputs, n=len(self.labels))

    def validation_auc(self) -> float:
        return mean_defined(roc_auc_per_label(self.labels, self.validation_scores()))

    def on_train_begin(self, logs=None):
        self.start_scores = self.validation_scores()
        self.scores = [mean_defined(roc_auc_per_label(self.labels, self.start_scores))]
        self.start_weights = self.head.get_weights()
        self.best_weights, self.best, self.gained_at = self.start_weights, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        self.last_scores = self.validation_scores()  # kept for EpochLog's validation loss
        score = mean_defined(roc_auc_per_label(self.labels, self.last_scores))
        logs[MONITOR] = score
        self.scores.append(score)
        if score > self.scores[self.best]:
            if score >= self.scores[self.gained_at] + self.min_delta:
                self.gained_at = epoch + 1
            self.best, self.best_weights = epoch + 1, self.head.get_weights()
        if epoch + 1 - self.gained_at >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.head.set_weights(self.best_weights)
        if self.keep_start and self.best > 0:
            self._keep_start_unless_better()

    def _keep_start_unless_better(self) -> None:
        level = selection_level(epochs=len(self.scores) - 1)
        gain = bootstrap_difference(
            self.labels,
            self.validation_scores(),
            self.start_scores,
            groups=self.patients,
            n_boot=SELECTION_BOOT,
            seed=self.seed,
            level=level,
        )
        low = gain["ci"][0]
        kept = low is None or low <= 0.0
        self.selection = {
            "best_val_epoch": self.best,
            "gain_over_start": gain["difference"],
            "gain_ci": gain["ci"],
            "gain_ci_level": level,  # two-sided: its lower end is the one-sided bound for the epochs
            "kept_start": kept,
        }
        if kept:
            self.best, self.best_weights = 0, self.start_weights
            self.head.set_weights(self.start_weights)

    def closing_note(self) -> str:
        """For the progress summary: that a head started at the probe kept it, and why."""
        if not self.keep_start or self.best > 0:
            return ""
        s = self.selection
        if not s.get("kept_start"):
            return self.kept_note
        gain = format_difference(s["gain_over_start"], s["gain_ci"], digits=4)
        return f"{self.kept_note} (epoch {s['best_val_epoch']}'s gain {gain})"


# Patient resamples of the validation split for the start-or-best choice: its bound sits far in the tail.
SELECTION_BOOT = 1000


def selection_level(*, epochs: int) -> float:
    """The two-sided level whose lower end is a one-sided 95 % bound shared by the `epochs` epochs the best
    was picked from (Bonferroni): the best of nine epochs beats the start by chance more often than one.
    Measured: with a one-sided 95 % bound alone, fc on a planted 6,000-row problem kept epoch 3 of 9, its
    validation gain +0.012 [+0.002, ...], and was 0.025 below the probe on test."""
    return 1.0 - 2 * 0.05 / max(epochs, 1)


class EpochLog(keras.callbacks.Callback):
    """Validation loss (the run's own loss, on BestEpoch's validation scores) and the learning rate at each
    epoch's end, into the logs (for TensorBoard) and kept for history.csv; after BestEpoch."""

    def __init__(self, *, best: BestEpoch, loss):
        super().__init__()
        self.best, self.loss = best, loss
        self.val_loss: list[float] = []
        self.learning_rate: list[float] = []

    def _val_loss(self, scores: np.ndarray) -> float:
        return float(ops.convert_to_numpy(self.loss(self.best.labels.astype("float32"), scores)))

    def on_train_begin(self, logs=None):
        self.val_loss = [self._val_loss(self.best.start_scores)]
        self.learning_rate = [math.nan]

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"] = self._val_loss(self.best.last_scores)
        logs["learning_rate"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.val_loss.append(logs["val_loss"])
        self.learning_rate.append(logs["learning_rate"])


class RandomView(keras.layers.Layer):
    """In training, one randomly chosen cached view per example (the same view for every backbone)."""

    def __init__(self, views: int, *, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.views = views
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs: list, training=None):
        if not training:
            return [x[:, 0] for x in inputs]
        view = keras.random.randint((ops.shape(inputs[0])[0],), 0, self.views, seed=self.seed_generator)
        return [_take_view(x, view) for x in inputs]


def _take_view(x, view):
    index = ops.reshape(view, (-1,) + (1,) * (len(x.shape) - 1))
    return ops.squeeze(ops.take_along_axis(x, index, axis=1), axis=1)


@dataclass(frozen=True)
class FittedHead:
    """A trained head, its history and the probe start it began from (None for a pixel head)."""

    model: keras.Model
    history: pd.DataFrame
    begin: HeadStart | None


@dataclass(frozen=True)
class ScoredHead:
    """Every row's probabilities, the calibration and thresholds fitted on validation, and the metrics."""

    scores: np.ndarray
    decisions: dict
    metrics: dict


def train_head(
    *,
    run_dir: Path,
    data: HeadData,
    head: HeadConfig,
    train: TrainConfig,
    label_names: Sequence[str],
    config_snapshot: dict,
    force: bool = False,
    progress: bool = True,
    eval_split: str = "test",
    decision: DecisionConfig | None = None,
    shared_start: HeadStart | None = None,
    plots: bool = True,
) -> dict:
    """Fit, score on `eval_split` and write every output of a run; returns its metrics.

    `shared_start`: the probe and directions fit_start gives for this data, when the caller has them
    already (a sweep fits them once per backbone set and reuses them for every trial); None fits them here.

    A sweep passes eval_split="val" so that trials are compared without ever looking at the test split.
    `decision`: how the calibration and operating points are fitted on validation after training
    (None: the defaults). `plots=False` leaves out the PNGs (a learning curve's points: on 2 busy cores
    the three plots took ~10 s of a 20 s point).
    """
    clock = {"start": time.perf_counter()}
    run_dir, label_names = Path(run_dir), list(label_names)
    rows, train = prepare_training(data, train=train, label_names=label_names)
    if progress:
        print(data.describe(), flush=True)
    with claim_run(run_dir, force=force) as tmp:
        if head.builder:  # the file as trained is kept; evaluate, predict and export load this copy
            config_snapshot = config_snapshot | {"head_code": keep_head_code(head.builder, tmp)}
        fitted = fit(
            data,
            rows=rows,
            head=head,
            train=train,
            n_labels=len(label_names),
            progress=progress,
            shared_start=shared_start,
        )
        clock["fitted"] = time.perf_counter()
        outputs = {"data": data, "label_names": label_names, "snapshot": config_snapshot, "plots": plots}
        metrics = _score_and_write(
            tmp,
            fitted=fitted,
            rows=rows,
            head=head,
            train=train,
            eval_split=eval_split,
            decision=decision,
            clock=clock,
            run_name=run_dir.name,
            **outputs,
        )
        finish_run(tmp, run_dir)
    return metrics


def prepare_training(
    data: HeadData, *, train: TrainConfig, label_names: list[str]
) -> tuple[dict, TrainConfig]:
    """(rows of each split, train with an "auto" batch size made a number); refuses data that cannot train."""
    rows = {split: data.rows(split) for split in ("train", "val", "test")}
    train = train.sized_for(rows["train"].size)
    _check_data(data, rows=rows, label_names=label_names, augment=train.augment)
    return rows, train


def save_fitted(
    *,
    run_dir: Path,
    fitted: FittedHead,
    data: HeadData,
    head: HeadConfig,
    train: TrainConfig,
    label_names: Sequence[str],
    config_snapshot: dict,
    seconds: tuple[float, float],
    force: bool = False,
    eval_split: str = "test",
    decision: DecisionConfig | None = None,
    plots: bool = True,
    baseline: np.ndarray | None = None,
) -> dict:
    """Score and write a head fitted elsewhere (heads/group.py trains a sweep's trials together) exactly as
    train_head writes its own run; returns its metrics. `seconds`: (start, end) of its training, the
    perf_counter times of the pass it was trained in; `baseline`: the metadata baseline on `eval_split`
    (heads.scoring.metadata_baseline), which every head of the pass shares."""
    run_dir, label_names = Path(run_dir), list(label_names)
    rows, train = prepare_training(data, train=train, label_names=label_names)
    now = time.perf_counter()  # its scoring starts now; its training is the pass's
    clock = {"start": now - (seconds[1] - seconds[0]), "fitted": now}
    with claim_run(run_dir, force=force) as tmp:
        outputs = {"data": data, "label_names": label_names, "snapshot": config_snapshot, "plots": plots}
        metrics = _score_and_write(
            tmp,
            fitted=fitted,
            rows=rows,
            head=head,
            train=train,
            eval_split=eval_split,
            decision=decision,
            clock=clock,
            run_name=run_dir.name,
            baseline=baseline,
            **outputs,
        )
        finish_run(tmp, run_dir)
    return metrics


def _score_and_write(
    tmp: Path,
    *,
    fitted: FittedHead,
    rows: dict,
    head: HeadConfig,
    train: TrainConfig,
    eval_split: str,
    decision: DecisionConfig | None,
    clock: dict,
    run_name: str,
    data: HeadData,
    label_names: list[str],
    snapshot: dict,
    plots: bool,
    baseline: np.ndarray | None = None,
) -> dict:
    """score, then write every output into the temporary folder `tmp`, metrics.json last."""
    scored = score(
        fitted,
        data,
        rows=rows,
        eval_split=eval_split,
        label_names=label_names,
        train=train,
        decision=decision or DecisionConfig(),
        baseline=baseline,
    )
    facts = _run_facts(
        Path(run_name),
        data=data,
        head=head,
        rows=rows,
        history=fitted.history,
        train=train,
        begin=fitted.begin,
    )
    scored.metrics.update(facts)
    clock["scored"] = time.perf_counter()
    write(
        tmp, fitted=fitted, scored=scored, data=data, label_names=label_names, snapshot=snapshot, plots=plots
    )
    scored.metrics["seconds"] = _seconds(clock)
    write_results(tmp / "metrics.json", scored.metrics)
    return scored.metrics


def fit(
    data: HeadData,
    *,
    rows: dict,
    head: HeadConfig,
    train: TrainConfig,
    n_labels: int,
    progress: bool,
    shared_start: HeadStart | None = None,
) -> FittedHead:
    """The probe start (feature heads; `shared_start` when given), then the head trained from it (or, with
    train.start = "none", from random layers beside it) with the best validation epoch kept."""
    spec = kind_of(head)
    begin = shared_start if spec.takes == "features" else None
    if spec.takes == "features" and begin is None:
        begin = fit_start(data, rows=rows, max_directions=start_directions(head, train), seed=train.seed)
    model, history = fit_head(
        data, rows=rows, head=head, train=train, n_labels=n_labels, progress=progress, start=begin
    )
    return FittedHead(model=model, history=history, begin=begin)


def score(
    fitted: FittedHead,
    data: HeadData,
    *,
    rows: dict,
    eval_split: str,
    label_names: list[str],
    train: TrainConfig,
    decision: DecisionConfig,
    baseline: np.ndarray | None = None,
) -> ScoredHead:
    """Probabilities of every row; calibration and operating points fitted on validation; the metrics of
    `eval_split` beside the baselines and, for a feature head, the ridge probe.

    A run scored on val (a sweep trial) uses and keeps its val rows only, so only those are predicted (the
    others are NaN): the other 90 % of the rows took ~3 s of each trial's scoring at full size.
    `baseline`: the metadata baseline on `eval_split` (scoring.metadata_baseline), when the caller has it."""
    everything = np.arange(len(data.names))
    needed = rows["val"] if eval_split == "val" else everything
    scores = np.full((len(data.names), len(label_names)), np.nan, dtype=np.float32)
    scores[needed] = predict_probabilities(fitted.model, data, needed)
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
    if fitted.begin is not None:
        metrics["reference"] = reference_metrics(
            data, fitted.begin, rows=evaluated, head_scores=scores[evaluated], label_names=label_names, **boot
        )
    return ScoredHead(scores=scores, decisions=decisions, metrics=metrics)


def write(
    run_dir: Path,
    *,
    fitted: FittedHead,
    scored: ScoredHead,
    data: HeadData,
    label_names: list[str],
    snapshot: dict,
    plots: bool = True,
) -> None:
    """Every file of the run but metrics.json (written last: a folder holding it is a finished run)."""
    write_json(run_dir / "config.json", snapshot)
    _write_outputs(run_dir, fitted=fitted, scored=scored, data=data, label_names=label_names, plots=plots)
    write_decision_outputs(
        run_dir,
        decisions=scored.decisions,
        data=data,
        scores=scored.scores,
        metrics=scored.metrics,
        label_names=label_names,
        plot=plots,
    )


def _seconds(clock: dict) -> dict:
    now = time.perf_counter()
    return {
        "train": round(clock["fitted"] - clock["start"], 2),
        "evaluate": round(clock["scored"] - clock["fitted"], 2),
        "write": round(now - clock["scored"], 2),
        "total": round(now - clock["start"], 2),
    }


def fit_head(
    data: HeadData,
    *,
    rows: dict,
    head: HeadConfig,
    train: TrainConfig,
    n_labels: int,
    progress: bool,
    start: HeadStart | None = None,
) -> tuple[keras.Model, pd.DataFrame]:
    """The trained head (stock layers only, so model.keras loads anywhere) and its history."""
    keras.utils.set_random_seed(train.seed)
    spec = head_spec(data, head=head, train=train, n_labels=n_labels, start=start)
    from_probe = start is not None and train.start == "probe"
    trained = build_head(**spec, byte_dropout=True)
    if from_probe and not kind_of(head).hidden:
        history = _closed_form(trained, data=data, rows=rows)
    else:
        correction = start.train_correction if from_probe else None
        history = _fit(
            trained,
            data=data,
            rows=rows,
            train=train,
            progress=progress,
            keep_start=from_probe,
            correction=correction,
            kept_note=KEPT_START if from_probe and start.directions.shape[1] else KEPT_PROBE,
        )
    model = build_head(**spec)
    model.set_weights(trained.get_weights())
    return model, history


def head_spec(data: HeadData, *, head: HeadConfig, train: TrainConfig, n_labels: int, start) -> dict:
    """build_head's arguments for `head` on `data`."""
    return {
        "start": start,
        "from_probe": train.start == "probe",
        "kind": head.kind,
        "inputs": {name: data.item_shape(name) for name in data.features},
        "n_labels": n_labels,
        "head": head,
        "metadata_dim": 0 if data.metadata is None else data.metadata.shape[1],
        "seed": train.seed,
    }


def _run_facts(
    run_dir: Path,
    *,
    data: HeadData,
    head: HeadConfig,
    rows: dict,
    history: pd.DataFrame,
    train: TrainConfig,
    begin: HeadStart | None = None,
) -> dict:
    """What metrics.json says about the run beside its scores."""
    epochs = train.epochs
    from_probe = kind_of(head).takes == "features" and train.start == "probe"
    directions = begin is not None and begin.directions.shape[1] > 0  # units beside the probe at the start
    # Never NaN: _check_data makes sure some label has both classes in val, and NaN scores raise.
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
    probe_scores = begin.probe.scores(list(probe_blocks(data).values()), rows)
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


def _check_data(data: HeadData, *, rows: dict, label_names: list[str], augment: bool) -> None:
    check_labels(data, label_names)
    for split in ("train", "val"):
        if rows[split].size == 0:
            raise InputError(
                f"the {split} split has no images with features; check the split policy and the caches"
            )
    val = data.labels[rows["val"]]
    if not ((val.sum(axis=0) > 0) & (val.sum(axis=0) < len(val))).any():
        raise InputError(
            f"no label has both classes in the val split ({len(val)} images), so early stopping has no "
            "AUC to watch; use more images or a larger val_fraction"
        )
    if augment and not any(data.views(name) > 1 for name in data.features):
        raise InputError(
            "augmenting trains on cached augmented views, but the caches hold one view per image; "
            "extract with [extract] views > 1 (e.g. views = 4), or train without augmentation"
        )


class FusedAdamW(keras.optimizers.AdamW):
    """Keras' AdamW, with each variable's step done in two operations: the decoupled weight decay, then
    TensorFlow's fused Adam kernel.

    Keras spells a step as a dozen elementwise operations per variable, and its weight decay evaluates
    the learning-rate schedule again for every variable; for a head of a million weights on a CPU that
    dispatch cost more than the arithmetic. The update is the same (decay by lr * weight_decay, then the
    bias-corrected Adam step with epsilon outside the square root): weights agree with Keras' AdamW to
    float32 rounding (tests/test_train.py).
    """

    def _apply_weight_decay(self, variables):
        """Done in update_step, with the learning rate the step already has."""

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        if self.weight_decay and self._use_weight_decay(variable):
            variable.assign_sub(variable * (lr * ops.cast(self.weight_decay, dtype)))
        if isinstance(gradient, tf.IndexedSlices) or self.amsgrad:
            return keras.optimizers.Adam.update_step(self, gradient, variable, learning_rate)
        step = ops.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=ops.power(beta_1, step),
            beta2_power=ops.power(beta_2, step),
            lr=lr,
            beta1=beta_1,
            beta2=beta_2,
            epsilon=ops.cast(self.epsilon, dtype),
            grad=gradient,
            use_locking=False,
        )


def compile_for_training(model: keras.Model, *, train: TrainConfig, labels_train: np.ndarray) -> None:
    """AdamW on a cosine schedule over the most epochs, and the configured loss; several steps per call,
    as small heads are overhead-bound on CPU."""
    steps = math.ceil(len(labels_train) / train.batch_size)
    model.compile(
        optimizer=training_optimizer(train, train_rows=len(labels_train)),
        loss=make_loss(train.loss, labels_train=labels_train, gamma=train.focal_gamma),
        steps_per_execution=max(1, min(train.steps_per_execution, steps)),
    )


def training_optimizer(train: TrainConfig, *, train_rows: int) -> FusedAdamW:
    """AdamW with train's learning rate on a cosine schedule over its most epochs."""
    steps = math.ceil(train_rows / train.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(train.lr, decay_steps=steps * train.epochs)
    return FusedAdamW(schedule, weight_decay=train.weight_decay)


def _fit(
    model: keras.Model,
    *,
    data: HeadData,
    rows: dict,
    train: TrainConfig,
    progress: bool,
    keep_start: bool = False,
    correction: np.ndarray | None = None,
    kept_note: str = KEPT_PROBE,
) -> pd.DataFrame:
    """Train with the best validation epoch kept (epoch 0 included; see BestEpoch for `keep_start`); the
    history has a row per epoch, `chosen` marking the one kept, and the choice in its attrs.
    `correction`: added to the training rows' logits (HeadStart.train_correction)."""
    best = BestEpoch(
        head=model,
        data=data,
        rows=rows["val"],
        patience=train.patience,
        min_delta=train.min_delta,
        keep_start=keep_start,
        seed=train.seed,
        kept_note=kept_note,
    )
    fit_model, batches = training_setup(
        model, data=data, rows=rows["train"], train=train, correction=correction
    )
    compile_for_training(fit_model, train=train, labels_train=data.labels[rows["train"]])
    log = EpochLog(best=best, loss=fit_model.loss)
    callbacks = [best, log]
    if train.tensorboard:  # after EpochLog: TensorBoard writes the logs it completes
        callbacks.append(keras.callbacks.TensorBoard(log_dir=train.tensorboard, write_graph=False))
    if progress:  # after BestEpoch: it shows the score BestEpoch puts into the logs
        callbacks.append(
            EpochProgress(
                epochs=train.epochs,
                monitor=MONITOR,
                start=lambda: best.scores[0],
                chosen=lambda: (best.best, best.scores[best.best]),
                note=best.closing_note,
            )
        )
    # shuffle=False: the batches are shuffled already (Keras cannot shuffle a dataset).
    history = fit_model.fit(batches, epochs=train.epochs, shuffle=False, callbacks=callbacks, verbose=0)
    return history_table(best, log, losses=history.history.get("loss", []), progress=progress)


def history_table(best: BestEpoch, log: EpochLog, *, losses: list[float], progress: bool) -> pd.DataFrame:
    """A row per epoch (epoch 0 the start), `chosen` marking the one kept, the choice in its attrs;
    `losses`: each trained epoch's mean training loss."""
    losses = [math.nan, *losses]
    epochs = np.arange(len(best.scores))
    table = pd.DataFrame(
        {
            "epoch": epochs,
            "loss": losses[: len(best.scores)],
            "val_loss": log.val_loss[: len(best.scores)],
            "learning_rate": log.learning_rate[: len(best.scores)],
            MONITOR: best.scores,
            "chosen": epochs == best.best,
        }
    )
    table.attrs["selection"] = best.selection
    table.attrs["warnings"] = _loss_warnings(losses)
    for warning in table.attrs["warnings"] if progress else ():
        print(f"warning: {warning}", flush=True)
    return table


# A mean training loss (BCE per label) below this after the first epoch: the head has almost nothing left
# to fit. Reached by heads adding to an in-sample probe on a few hundred images (2.4e-06); an honest
# residual on the demo's sample is ~0.1.
LOSS_FLOOR = 1e-3


def _loss_warnings(losses: list[float]) -> list[str]:
    """What the training losses say is wrong with the run, in words."""
    if len(losses) < 2 or not losses[1] < LOSS_FLOOR:
        return []
    return [
        f"the training loss was {losses[1]:.2g} after the first epoch: the head has almost nothing left "
        "to fit on its training rows. Likely causes: features that identify each training image (a "
        "backbone far wider than the training set), labels that follow from the features, or duplicate "
        "images across patients"
    ]


def _closed_form(model: keras.Model, *, data: HeadData, rows: dict) -> pd.DataFrame:
    """A head with nothing to train (the linear probe): its one "epoch" is the start."""
    best = BestEpoch(head=model, data=data, rows=rows["val"], patience=1, min_delta=0.0)
    return pd.DataFrame(
        {
            "epoch": [0],
            "loss": [math.nan],
            "val_loss": [math.nan],  # nothing trained, no loss
            "learning_rate": [math.nan],
            MONITOR: [best.validation_auc()],
            "chosen": [True],
        }
    )


class GatherRows(keras.layers.Layer):
    """Looks a batch of row ids up in the training arrays, inside the compiled training step.

    Keras' numpy input casts float16 features to float32 and copies them twice (about 2 GB more at full
    size); gathering in tf.data threads instead fights the step's own threads on a 2-core CPU. Here one
    copy stays in its cached dtype and each batch is gathered in-step, then cast by the head.
    """

    def __init__(self, arrays: dict, **kwargs):
        super().__init__(**kwargs)
        self.names = list(arrays)
        self.tables = [tf.convert_to_tensor(arrays[name]) for name in self.names]

    def call(self, rows):
        return [tf.gather(table, rows) for table in self.tables]


def training_setup(
    model: keras.Model,
    *,
    data: HeadData,
    rows: np.ndarray,
    train: TrainConfig,
    correction: np.ndarray | None = None,
) -> tuple[keras.Model, tf.data.Dataset]:
    """(model to fit, its batches): row ids in, features gathered in-step, one random cached view per
    example when augmenting; it shares `model`'s weights. Batches follow a new seeded permutation each epoch.
    `correction` (len(rows), L): added to each row's logit before the sigmoid (the out-of-fold probe)."""
    streamed = streamed_inputs(model, data)  # token caches left on disk come in batches (heads/stream.py)
    check_streamable(streamed, augment=train.augment)
    arrays = training_arrays(model, data=data, rows=rows, augment=train.augment, leave_out=streamed)
    row_ids = keras.Input(shape=(), dtype="int64", name="row_ids")
    gathered = (
        dict(zip(arrays, GatherRows(arrays, name="gather_rows")(row_ids), strict=True)) if arrays else {}
    )
    gathered |= (read := stream_model_inputs(streamed))
    if train.augment:
        names = [name for name in arrays if name != METADATA_INPUT]
        picked = random_view(arrays, seed=train.seed)([gathered[name] for name in names])
        gathered.update(zip(names, picked, strict=True))
    outputs = model(gathered) if correction is None else _corrected(model, gathered, row_ids, correction)
    fit_model = keras.Model({ROW_IDS: row_ids, **read} if streamed else row_ids, outputs, name="training")
    if streamed:
        return fit_model, stream_batches(streamed, rows=rows, labels=data.labels, train=train)
    return fit_model, row_batches(data.labels[rows], batch_size=train.batch_size, seed=train.seed)


def training_arrays(
    model: keras.Model, *, data: HeadData, rows: np.ndarray, augment: bool, leave_out=()
) -> dict:
    """{input name: tensor} of `model`'s inputs on the training rows (every cached view when augmenting),
    but those named in `leave_out`."""
    # One input at a time: each training copy becomes a tensor and is dropped before the next is made
    # (all at once, the copies and the tensors of an ensemble coexisted: ~0.5 GB more at full size).
    arrays = {}
    for tensor in model.inputs:
        if tensor.name in leave_out:
            continue
        (array,) = head_inputs(model, data, rows, all_views=augment, only=tensor.name).values()
        arrays[tensor.name] = tf.convert_to_tensor(array)
        del array
    return arrays


def random_view(arrays: dict, *, seed: int) -> RandomView:
    """The RandomView layer for the training arrays' feature inputs (the metadata has no views)."""
    views = {arrays[name].shape[1] for name in arrays if name != METADATA_INPUT}
    if len(views) != 1:
        raise InputError(f"--augment needs the same number of cached views in every cache, got {views}")
    return RandomView(views.pop(), seed=seed)


def _corrected(model: keras.Model, gathered: dict, row_ids, correction: np.ndarray):
    """sigmoid(the head's logit + each row's correction): the head's own layers, as it trains them."""
    logits = keras.Model(model.input, model.get_layer("labels").input, name="logits")
    (offset,) = GatherRows({"correction": correction}, name="gather_correction")(row_ids)
    return keras.layers.Activation("sigmoid")(keras.layers.Add()([logits(gathered), offset]))


def row_batches(labels: np.ndarray, *, batch_size: int, seed: int) -> tf.data.Dataset:
    """(row ids, labels) batches; the last one may be short."""
    n = len(labels)
    targets = tf.convert_to_tensor(labels, dtype=tf.float32)
    full, rest = divmod(n, batch_size)

    def batches_of(order):
        batches = tf.data.Dataset.from_tensor_slices(
            tf.reshape(order[: full * batch_size], (full, batch_size))
        )
        return (
            batches.concatenate(tf.data.Dataset.from_tensors(order[full * batch_size :])) if rest else batches
        )

    # A stateful shuffle inside the dataset draws a new (seeded) permutation each time fit iterates it.
    orders = tf.data.Dataset.from_tensors(tf.range(n, dtype=tf.int64)).map(
        lambda r: tf.random.shuffle(r, seed=seed)
    )
    dataset = orders.flat_map(batches_of).map(lambda ids: (ids, tf.gather(targets, ids)))
    # flat_map hides the length; stating it lets Keras count steps and run whole executions.
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(full + (rest > 0)))
    # tf.data's autotuner wakes in the background of every new epoch's iterator; on 2 cores it made
    # about a quarter of fc epochs take twice as long (4.8 s instead of 2.4 s on the full-size bench).
    # Nothing here needs tuning: the buffer is fixed and each map is trivial.
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(2).with_options(options)


def _write_outputs(
    run_dir: Path,
    *,
    fitted: FittedHead,
    scored: ScoredHead,
    data: HeadData,
    label_names: list[str],
    plots: bool = True,
) -> None:
    """Everything but config.json, metrics.json and the decisions. A run scored on val (a sweep trial)
    keeps only val rows' predictions: the test split stays sealed."""
    metrics, scores = scored.metrics, scored.scores
    fitted.model.save(run_dir / "model.keras")
    fitted.history.to_csv(run_dir / "history.csv", index=False)
    shown = data.rows("val") if metrics["split"] == "val" else np.arange(len(data.names))
    predictions = pd.DataFrame(scores[shown], columns=label_names)
    predictions.insert(0, "split", data.split[shown])
    predictions.insert(0, "name", data.names[shown])
    predictions.to_csv(run_dir / "predictions.csv", index=False, float_format="%.6f")
    # run_dir is the temporary folder: the run's own name is in the metrics.
    write_auc_table(metrics, run_dir / "auc.md", label_names=label_names, run_name=metrics["run"])
    if not plots:
        return
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
