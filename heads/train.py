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
from heads.data import HeadData, head_inputs, training_arrays, training_rows
from heads.losses import make_loss
from heads.models import METADATA_INPUT, build_head
from heads.outputs import write_run
from heads.progress import EpochProgress
from heads.run_folder import claim_run, finish_run
from heads.scoring import MONITOR, predict_arrays, run_facts, score
from heads.settings import HeadConfig, TrainConfig, kind_of, start_directions
from heads.start import HeadStart, fit_start
from heads.stream import ROW_IDS, check_streamable, stream_batches, stream_model_inputs, streamed_inputs
from results.format import KEPT_PROBE, KEPT_START, format_difference
from results.metrics import bootstrap_difference, mean_defined, roc_auc_per_label
from results.settings import DecisionConfig


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
        inputs: dict,
        kept_note: str = KEPT_PROBE,
    ):
        super().__init__()
        self.head, self.patience, self.min_delta = head, patience, min_delta
        self.kept_note = kept_note  # what the summary calls a start kept: the probe, or more
        # head_inputs of the val rows, gathered once, not every epoch; heads trained together share them.
        self.inputs = inputs
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

    def __init__(self, *, best: BestEpoch, loss=None):
        super().__init__()
        self.best, self.loss = best, loss  # None: the loss the model is compiled with, once it trains
        self.val_loss: list[float] = []
        self.learning_rate: list[float] = []

    def _val_loss(self, scores: np.ndarray) -> float:
        return float(ops.convert_to_numpy(self.loss(self.best.labels.astype("float32"), scores)))

    def on_train_begin(self, logs=None):
        self.loss = self.model.loss if self.loss is None else self.loss
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
    rows = training_rows(data, label_names=label_names, augment=train.augment)
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
    rows = training_rows(data, label_names=label_names, augment=train.augment)
    return rows, train.sized_for(rows["train"].size)


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
    """score (heads/scoring.py) with what the fit says about the run, then write every output into the
    temporary folder `tmp` (heads/outputs.py), metrics.json last."""
    scored = score(
        data,
        model=fitted.model,
        begin=fitted.begin,
        rows=rows,
        eval_split=eval_split,
        label_names=label_names,
        train=train,
        decision=decision or DecisionConfig(),
        baseline=baseline,
    )
    facts = run_facts(
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
    write_run(
        tmp,
        model=fitted.model,
        history=fitted.history,
        scored=scored,
        data=data,
        label_names=label_names,
        snapshot=snapshot,
        clock=clock,
        plots=plots,
    )
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
    train.start = "none", from random layers beside it) with the best validation epoch kept. An "auto"
    batch size is made a number for the training rows."""
    train = train.sized_for(rows["train"].size)
    directions = start_directions(head, train)
    spec = kind_of(head)
    begin = shared_start if spec.takes == "features" else None
    if spec.takes == "features" and begin is None:
        begin = fit_start(data, rows=rows, max_directions=directions, seed=train.seed)
    model, history = fit_head(
        data, rows=rows, head=head, train=train, n_labels=n_labels, progress=progress, start=begin
    )
    return FittedHead(model=model, history=history, begin=begin)


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
    # Its inputs, gathered once: the val rows for BestEpoch, the training rows for a head that trains.
    val_inputs = head_inputs(trained, data, rows["val"])
    closed_form = from_probe and not kind_of(head).hidden
    # Token caches left on disk (beyond [train] token_memory_gb) come in batches: heads/stream.py.
    streamed = {} if closed_form else streamed_inputs(trained, data)
    check_streamable(streamed, augment=train.augment)
    arrays = (
        None
        if closed_form
        else training_arrays(
            trained, data=data, rows=rows["train"], augment=train.augment, leave_out=streamed
        )
    )
    if closed_form:
        history = _closed_form(trained, data=data, rows=rows, inputs=val_inputs)
    else:
        correction = start.train_correction if from_probe else None
        history = _fit(
            trained,
            data=data,
            rows=rows,
            val_inputs=val_inputs,
            arrays=arrays,
            streamed={name: cache.take(rows["train"]) for name, cache in streamed.items()},
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
    val_inputs: dict,
    arrays: dict,
    train: TrainConfig,
    progress: bool,
    keep_start: bool = False,
    correction: np.ndarray | None = None,
    kept_note: str = KEPT_PROBE,
    streamed: dict | None = None,
) -> pd.DataFrame:
    """Train with the best validation epoch kept (epoch 0 included; see BestEpoch for `keep_start`); the
    history has a row per epoch, `chosen` marking the one kept, and the choice in its attrs.
    `val_inputs`: the head's inputs on the val rows; `arrays`: on the training rows (training_arrays);
    `correction`: added to the training rows' logits (HeadStart.train_correction); `streamed`: inputs
    read from disk in batches (training_model)."""
    labels_train = data.labels[rows["train"]]
    best = BestEpoch(
        head=model,
        data=data,
        rows=rows["val"],
        inputs=val_inputs,
        patience=train.patience,
        min_delta=train.min_delta,
        keep_start=keep_start,
        seed=train.seed,
        kept_note=kept_note,
    )
    log = EpochLog(best=best)  # its loss: the one compile_for_training gives the model
    fit_model, batches = training_model(
        model, arrays, labels=labels_train, train=train, correction=correction, streamed=streamed
    )
    compile_for_training(fit_model, train=train, labels_train=labels_train)
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


def _closed_form(model: keras.Model, *, data: HeadData, rows: dict, inputs: dict) -> pd.DataFrame:
    """A head with nothing to train (the linear probe): its one "epoch" is the start (`inputs`: on val)."""
    best = BestEpoch(head=model, data=data, rows=rows["val"], inputs=inputs, patience=1, min_delta=0.0)
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
    return training_model(
        model,
        arrays,
        labels=data.labels[rows],
        train=train,
        correction=correction,
        streamed={name: cache.take(rows) for name, cache in streamed.items()},
    )


def training_model(
    model: keras.Model,
    arrays: dict,
    *,
    labels: np.ndarray,
    train: TrainConfig,
    correction: np.ndarray | None = None,
    streamed: dict | None = None,
) -> tuple[keras.Model, tf.data.Dataset]:
    """training_setup on the training arrays already gathered (training_arrays), with their `labels`;
    `streamed`: the inputs read from disk in batches instead, each taken on the training rows."""
    streamed = streamed or {}
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
        return fit_model, stream_batches(streamed, labels=labels, train=train)
    return fit_model, row_batches(labels, batch_size=train.batch_size, seed=train.seed)


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
