"""One progress bar per training run, and one closing line, in place of Keras' line per epoch."""

import math
import sys
import time
from collections.abc import Callable

import keras
from tqdm import tqdm

from cxr14.text import duration

LOG_INTERVAL = 10.0  # seconds between the bar's refreshes where standard error is not a terminal


class EpochProgress(keras.callbacks.Callback):
    """A bar over the run's epochs (moving within an epoch too), with the validation mean AUC, the best
    so far and the time left; then one line: epochs, time, the best epoch and why training stopped.

    Keras' own progress (verbose=1) prints a line per epoch, and its step counter runs past its total
    under steps_per_execution ("96/77"). Goes after the callback that puts `monitor` into the logs;
    `start`, when given, returns the score before training (epoch 0), for a run that counts it; `chosen`
    returns the (epoch, score) the run keeps where that callback decides it at the end, and `note` a
    sentence for the closing line. The bar goes to standard error, like extraction's (refreshed at most
    every LOG_INTERVAL seconds, and at each epoch's end, where that is not a terminal: a log file gets a
    few updates, not thousands); `bar=False` leaves it out. The closing line goes to standard output.
    """

    def __init__(
        self,
        *,
        epochs: int,
        monitor: str,
        start: Callable[[], float] | None = None,
        chosen: Callable[[], tuple[int, float]] | None = None,
        note: Callable[[], str] | None = None,
        bar: bool = True,
    ):
        super().__init__()
        self.epochs = epochs
        self.monitor = monitor
        self.start, self.chosen, self.note = start, chosen, note
        self.show_bar = bar

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()
        self.epoch, self.done, self.best, self.best_epoch = 0, 0, -math.inf, 0
        if self.start is not None:
            self.best = float(self.start())
        self.bar = tqdm(
            total=self.epochs,
            desc=f"epoch 1/{self.epochs}",
            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
            disable=not self.show_bar,
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else LOG_INTERVAL,
        )

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.bar.set_description_str(f"epoch {epoch + 1}/{self.epochs}", refresh=False)

    def on_train_batch_end(self, batch, logs=None):
        # Under steps_per_execution Keras reports the last step of each execution; never past the epoch.
        steps = self.params.get("steps") or 0
        if steps:
            self._move_to(self.epoch + min(1.0, (batch + 1) / steps))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is not None and value > self.best:
            self.best, self.best_epoch = float(value), epoch + 1
        self.done = epoch + 1
        self._move_to(self.done)
        shown = [f"val AUC {_auc(value)}", f"best {_auc(self.best)} @{self.best_epoch}"]
        if "loss" in logs:
            shown.append(f"loss {float(logs['loss']):.4f}")
        self.bar.set_postfix_str(", ".join(shown))

    def on_train_end(self, logs=None):
        if self.done < self.epochs:  # stopped early: the bar ends full at the epochs that ran
            self.bar.total = self.done
        self.bar.refresh()
        self.bar.close()
        if self.chosen is not None:
            self.best_epoch, self.best = self.chosen()
        print(self.summary(), flush=True)

    def summary(self) -> str:
        """The closing line."""
        seconds = time.perf_counter() - self.started
        each = f" ({duration(seconds / self.done)} an epoch)" if self.done else ""
        why = "stopped early: no further gain" if self.done < self.epochs else f"ran all {self.epochs} epochs"
        note = self.note() if self.note is not None else ""
        return (
            f"trained {self.done} epochs in {duration(seconds)}{each}; kept epoch {self.best_epoch}, "
            f"validation mean AUC {_auc(self.best)}; {why}" + (f"; {note}" if note else "")
        )

    def _move_to(self, position: float) -> None:
        self.bar.update(position - self.bar.n)


def _auc(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{float(value):.4f}"
