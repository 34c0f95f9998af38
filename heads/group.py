"""Feature heads trained together: one pass over the batches for several trials that see the same batches.

A sweep's trials often differ only in what happens after the inputs (learning rate, dropout, units, loss,
patience). Trained one at a time, each pays for gathering and standardizing every batch again; here the
batch is gathered from one copy of the training arrays and standardized once, then every head still
training takes its own step on it, with its own AdamW state and schedule, loss, dropout masks and early
stop. A head whose patience ran out takes no more steps (nor is it computed); each keeps its best epoch.

Each head is built, seeded and started as train_head builds it, its dropout and the batch order drawn
from the same seeds, so a trial trained here takes the same steps as the trial trained alone (weights
agree to float32 rounding: tests/test_group.py). The heads come back as stock heads (FittedHead), for
train.save_fitted to score and write like any run.
"""

import dataclasses
import types

import keras
import numpy as np
import tensorflow as tf

from heads.data import METADATA_INPUT, HeadData, head_inputs
from heads.losses import make_loss
from heads.models import build_head
from heads.settings import TRAIN_FIELDS, HeadConfig, TrainConfig, kind_of, start_directions
from heads.start import HeadStart
from heads.train import (
    BestEpoch,
    EpochLog,
    FittedHead,
    GatherRows,
    head_spec,
    history_table,
    random_view,
    row_batches,
    training_arrays,
    training_optimizer,
)
from results.format import KEPT_PROBE, KEPT_START

# Training settings each head of a group has its own of; every other one makes the batches (or the
# start) and must be the same across the group. bootstrap only scores.
OWN_SETTINGS = ("lr", "weight_decay", "loss", "focal_gamma", "patience", "min_delta", "bootstrap")


def batch_key(head: HeadConfig, train: TrainConfig) -> tuple | None:
    """What a head's batches and start depend on (trials with equal keys, on the same data, train
    together); None for a head that trains alone: a head of one's own file (its layers are its own), the
    cnn (pixels), a closed-form probe (nothing to train), a run logged to TensorBoard (per-run logs)."""
    spec = kind_of(head)
    if head.builder or spec.takes != "features" or train.tensorboard:
        return None
    if train.start == "probe" and not spec.hidden:
        return None
    shared = tuple((name, getattr(train, name)) for name in TRAIN_FIELDS if name not in OWN_SETTINGS)
    return (*shared, ("directions", start_directions(head, train)))


@dataclasses.dataclass(frozen=True)
class Member:
    """One head of a group and its training settings."""

    head: HeadConfig
    train: TrainConfig


def fit_together(
    data: HeadData,
    *,
    rows: dict,
    members: list[Member],
    n_labels: int,
    start: HeadStart,
    progress: bool = False,
) -> list[FittedHead]:
    """Every member trained in one pass over the batches, best validation epoch kept; in members' order.
    `start`: the members' shared probe start (fit_start); their batch_keys must be equal."""
    keys = {batch_key(m.head, m.train) for m in members}
    assert len(keys) == 1 and None not in keys, "members of a group share their batches"
    shared = members[0].train
    keras.utils.set_random_seed(shared.seed)  # as fit_head: the batch order comes from it
    specs = [head_spec(data, head=m.head, train=m.train, n_labels=n_labels, start=start) for m in members]
    trained = [build_head(**spec, byte_dropout=True) for spec in specs]
    histories = _train(trained, data=data, rows=rows, members=members, start=start, progress=progress)
    fitted = []
    for spec, model, history in zip(specs, trained, histories, strict=True):
        stock = build_head(**spec)  # stock layers only, so model.keras loads anywhere
        stock.set_weights(model.get_weights())
        fitted.append(FittedHead(model=stock, history=history, begin=start))
    return fitted


def _train(models, *, data: HeadData, rows: dict, members: list[Member], start, progress: bool) -> list:
    """The epochs of every head still training, each watched by its own BestEpoch; their histories."""
    shared = members[0].train
    from_probe = shared.start == "probe"
    step = GroupStep(
        models,
        data=data,
        rows=rows["train"],
        members=members,
        correction=start.train_correction if from_probe else None,
    )
    val_inputs = head_inputs(models[0], data, rows["val"])  # one validation copy for every head
    watch = []
    for k, (model, member) in enumerate(zip(models, members, strict=True)):
        best = BestEpoch(
            head=model,
            data=data,
            rows=rows["val"],
            patience=member.train.patience,
            min_delta=member.train.min_delta,
            keep_start=from_probe,
            seed=member.train.seed,
            inputs=val_inputs,
            kept_note=KEPT_START if from_probe and start.directions.shape[1] else KEPT_PROBE,
        )
        log = EpochLog(best=best, loss=step.losses[k])
        # The callbacks read the optimizer and set stop_training on what they take for the model.
        owner = types.SimpleNamespace(optimizer=step.optimizers[k], stop_training=False)
        for callback in (best, log):
            callback.set_model(owner)
            callback.on_train_begin()
        watch.append((best, log, owner))
    losses = _epochs(step, watch, data=data, rows=rows, shared=shared, progress=progress)
    for best, _, _ in watch:
        best.on_train_end()
    return [
        history_table(best, log, losses=losses[k], progress=progress)
        for k, (best, log, _) in enumerate(watch)
    ]


def _epochs(step, watch: list, *, data: HeadData, rows: dict, shared: TrainConfig, progress: bool) -> list:
    """Train until every head has stopped or the epochs run out; each head's mean training loss per epoch."""
    batches = row_batches(data.labels[rows["train"]], batch_size=shared.batch_size, seed=shared.seed)
    active = list(range(len(watch)))
    losses = [[] for _ in watch]
    for epoch in range(shared.epochs):
        means = step.epoch(batches, tuple(active))
        for k, mean in zip(active, means, strict=True):
            best, log, _ = watch[k]
            logs = {"loss": mean}
            best.on_epoch_end(epoch, logs)
            log.on_epoch_end(epoch, logs)
            losses[k].append(mean)
        active = [k for k in active if not watch[k][2].stop_training]
        if progress:
            scores = " ".join(f"{watch[k][0].scores[-1]:.4f}" for k in range(len(watch)))
            print(f"  epoch {epoch + 1}: val mean AUC {scores}; {len(active)} still training", flush=True)
        if not active:
            break
    return losses


class GroupStep:
    """The training step of a group: gather a batch, pick a view, standardize once; then a step of every
    active head on it with its own optimizer. Retraced once per set of active heads (a few times a run)."""

    def __init__(self, models: list, *, data: HeadData, rows: np.ndarray, members: list[Member], correction):
        shared = members[0].train
        first = models[0]
        arrays = training_arrays(first, data=data, rows=rows, augment=shared.augment)
        self.names = list(arrays)
        self.gather = GatherRows(arrays, name="gather_rows")
        self.view = random_view(arrays, seed=shared.seed) if shared.augment else None
        # Every head of a group standardizes by the same training moments (the shared start): one does.
        self.standardize = [first.get_layer(f"standardize_{name}") for name in self.names]
        self.offsets = None if correction is None else GatherRows({"correction": correction})
        self.heads = [self._after_standardizing(m, logits=correction is not None) for m in models]
        labels = data.labels[rows]
        self.optimizers = [training_optimizer(m.train, train_rows=len(rows)) for m in members]
        self.losses = [
            make_loss(m.train.loss, labels_train=labels, gamma=m.train.focal_gamma) for m in members
        ]
        for head, optimizer in zip(self.heads, self.optimizers, strict=True):
            optimizer.build(head.trainable_variables)
        self._steps = {}

    def _after_standardizing(self, model: keras.Model, *, logits: bool) -> keras.Model:
        """The head from its standardized inputs on (its own layers, shared with `model`); its logits
        where the probe's out-of-fold correction is added to them."""
        inputs = [model.get_layer(f"standardize_{name}").output for name in self.names]
        output = model.get_layer("labels").input if logits else model.output
        return keras.Model(inputs, output)

    def epoch(self, batches: tf.data.Dataset, active: tuple) -> list[float]:
        """One pass over the batches; each active head's mean training loss (weighted by batch size, as
        Keras' own)."""
        if active not in self._steps:
            self._steps[active] = tf.function(lambda ids, y: self._step(ids, y, active))
        step = self._steps[active]
        totals, count = [], 0
        for ids, targets in batches:
            totals.append(step(ids, targets) * tf.cast(tf.shape(ids)[0], tf.float32))
            count += int(ids.shape[0])
        return [float(v) / count for v in tf.add_n(totals).numpy()]

    def _step(self, ids, targets, active: tuple):
        gathered = self.gather(ids)
        if self.view is not None:
            features = [i for i, name in enumerate(self.names) if name != METADATA_INPUT]
            picked = self.view([gathered[i] for i in features], training=True)
            for i, tensor in zip(features, picked, strict=True):
                gathered[i] = tensor
        standard = [
            layer(tf.cast(x, tf.float32)) for layer, x in zip(self.standardize, gathered, strict=True)
        ]
        offset = None if self.offsets is None else tf.cast(self.offsets(ids)[0], tf.float32)
        losses = []
        for k in active:
            head = self.heads[k]
            with tf.GradientTape() as tape:
                scores = head(standard, training=True)
                if offset is not None:
                    scores = tf.sigmoid(scores + offset)
                loss = self.losses[k](targets, scores)
                if head.losses:  # weight penalties (heads.l2), as Keras adds them in fit
                    loss = loss + tf.add_n(head.losses)
            variables = head.trainable_variables
            self.optimizers[k].apply(tape.gradient(loss, variables), variables)
            losses.append(loss)
        return tf.stack(losses)
