"""heads.progress: one bar per run that never runs past its total, and one closing line."""

import keras
import numpy as np
import pytest

from heads.progress import EpochProgress


class _FakeAUC(keras.callbacks.Callback):
    """Puts a made-up validation AUC into the logs: it peaks at epoch 3."""

    def on_epoch_end(self, epoch, logs=None):
        logs["val_mean_auc"] = (0.6, 0.7, 0.9, 0.8, 0.85, 0.8, 0.7)[epoch]


class _Positions(keras.callbacks.Callback):
    """Records where the bar stands after each execution."""

    def __init__(self, progress):
        super().__init__()
        self.progress, self.seen = progress, []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(self.progress.bar.n)


def _fit(epochs: int, *, patience: int | None = None) -> tuple[EpochProgress, list[float]]:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    # 10 steps an epoch, 4 per execution: Keras' own bar counted past its total here ("96/77").
    model.compile("sgd", "mse", steps_per_execution=4)
    progress = EpochProgress(epochs=epochs, monitor="val_mean_auc", bar=True)
    positions = _Positions(progress)
    callbacks = [_FakeAUC()]
    if patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_mean_auc", mode="max", patience=patience))
    x = np.zeros((40, 3), np.float32)
    model.fit(
        x, x[:, :1], batch_size=4, epochs=epochs, verbose=0, callbacks=[*callbacks, progress, positions]
    )
    return progress, positions.seen


def test_the_bar_moves_within_epochs_and_never_past_its_total(capsys):
    progress, seen = _fit(3)
    assert seen == sorted(seen) and max(seen) <= 3
    assert seen[:3] == pytest.approx([0.4, 0.8, 1.0])  # steps 4, 8 and the last 2 of epoch 1
    assert progress.bar.n == progress.bar.total == 3
    captured = capsys.readouterr()
    assert captured.out.startswith("trained 3 epochs in ")
    assert "kept epoch 3, validation mean AUC 0.9000; ran all 3 epochs" in captured.out
    assert "val AUC 0.9000, best 0.9000 @3" in captured.err  # the bar's last state


def test_a_start_better_than_every_epoch_is_the_best(capsys):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    progress = EpochProgress(epochs=2, monitor="val_mean_auc", start=lambda: 0.95, bar=False)
    x = np.zeros((8, 3), np.float32)
    model.fit(x, x[:, :1], batch_size=4, epochs=2, verbose=0, callbacks=[_FakeAUC(), progress])
    assert "kept epoch 0, validation mean AUC 0.9500; ran all 2 epochs" in capsys.readouterr().out


def test_the_closing_line_names_the_epoch_the_run_chose_and_why(capsys):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    progress = EpochProgress(
        epochs=3,
        monitor="val_mean_auc",
        start=lambda: 0.85,
        chosen=lambda: (0, 0.85),
        note=lambda: "kept the start",
        bar=False,
    )
    x = np.zeros((8, 3), np.float32)
    model.fit(x, x[:, :1], batch_size=4, epochs=3, verbose=0, callbacks=[_FakeAUC(), progress])
    assert (
        "kept epoch 0, validation mean AUC 0.8500; ran all 3 epochs; kept the start"
        in capsys.readouterr().out
    )


def test_early_stopping_ends_the_bar_full_and_says_why(capsys):
    progress, _ = _fit(7, patience=2)
    assert progress.done == 5 and progress.bar.total == 5 and progress.bar.n == 5
    out = capsys.readouterr().out
    assert "trained 5 epochs in " in out
    assert "kept epoch 3, validation mean AUC 0.9000; stopped early: no further gain" in out
