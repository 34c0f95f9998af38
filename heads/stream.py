"""Training batches from token caches left on disk (cache/stream.py): a cache larger than [train]
token_memory_gb is read a block of stored rows at a time, shuffled by block and within a buffer of blocks,
each batch carrying its row ids so that rows, labels and names never get out of step.

Per epoch, the training rows' blocks come in a seeded random order, cut into buffers of whole batches
(a fifth of the budget each); a buffer's rows are shuffled together, read and cut into batches. While one
buffer's batches are trained on, a thread reads the next, so the disk and the head's arithmetic overlap.
Two runs with the same seed see the same batches.
"""

import concurrent.futures
import contextlib
import math
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from cache.stream import StreamedFeatures
from cxr14.errors import InputError

ROW_IDS = "row_ids"  # the input holding each example's position among the training rows
# Of the budget, what one buffer of rows may take: the buffer being trained on, the one read meanwhile and
# the temporaries of a read stay within half the budget.
BUFFER_SHARE = 0.2


def streamed_inputs(model: keras.Model, data) -> dict[str, StreamedFeatures]:
    """{input name: its cache on disk} for the inputs of `model` whose cache is streamed."""
    return {
        t.name: data.features[t.name]
        for t in model.inputs
        if isinstance(data.features.get(t.name), StreamedFeatures)
    }


def stream_model_inputs(streamed: dict[str, StreamedFeatures]) -> dict:
    """A keras.Input per streamed cache, of its stored per-row shape and dtype."""
    return {
        name: keras.Input(shape=s.item_shape, dtype=str(s.dtype), name=name) for name, s in streamed.items()
    }


def stream_batches(on_rows: dict[str, StreamedFeatures], *, labels, train) -> tf.data.Dataset:
    """({row_ids, name: features}, labels) batches of streamed caches each taken on the training rows
    (StreamedFeatures.take), by train's batch size and seed; `labels`: the training rows' labels; row ids
    are positions among the training rows."""
    batches = BlockBatches(on_rows, batch_size=train.batch_size, seed=train.seed)
    return batches.dataset(labels)


class BlockBatches:
    """Per epoch, (row ids, {name: rows}) batches of the training rows of streamed caches.

    `streamed`: each cache taken on the training rows (StreamedFeatures.take(rows)), all in the same row
    order; row ids are positions in that order. Blocks are the first cache's stored rows // block_rows.
    """

    def __init__(self, streamed: dict[str, StreamedFeatures], *, batch_size: int, seed: int):
        self.streamed, self.batch_size, self.seed = streamed, batch_size, seed
        first = next(iter(streamed.values()))
        blocks = first.positions // first.block_rows
        order = np.argsort(blocks, kind="stable")
        cuts = np.flatnonzero(np.diff(blocks[order])) + 1
        self.blocks = np.split(order, cuts) if len(order) else []  # row ids of each block, stored order
        row_bytes = sum(s.row_bytes for s in streamed.values())
        self.buffer_rows = max(batch_size, int(first.budget_bytes * BUFFER_SHARE) // max(1, row_bytes))
        self.epoch = 0

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.blocks)

    def __call__(self) -> Iterator[tuple[np.ndarray, dict]]:
        """The next epoch's batches (each call is one epoch: Keras iterates the dataset once per epoch)."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.epoch_batches(epoch)

    def buffers(self, epoch: int) -> list[np.ndarray]:
        """The row ids of each buffer of `epoch`: the blocks in a seeded random order, cut into buffers of
        whole batches (a block may span two), each buffer's rows in a seeded random order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = [self.blocks[b] for b in rng.permutation(len(self.blocks))]
        ids = np.concatenate(order) if order else np.zeros(0, np.int64)
        size = max(1, self.buffer_rows // self.batch_size) * self.batch_size
        return [part[rng.permutation(len(part))] for part in np.split(ids, range(size, len(ids), size))]

    def epoch_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, dict]]:
        """(row ids, {name: features}) batches of `epoch`: every training row once; the next buffer is read
        while this one's batches are trained on."""
        buffers = self.buffers(epoch)
        with _Readers(self.streamed) as read, concurrent.futures.ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(read, buffers[0]) if buffers else None
            for i, ids in enumerate(buffers):
                arrays = pending.result()
                pending = ahead.submit(read, buffers[i + 1]) if i + 1 < len(buffers) else None
                for begin in range(0, len(ids), self.batch_size):
                    batch = slice(begin, begin + self.batch_size)
                    yield ids[batch], {name: a[batch] for name, a in arrays.items()}
                del arrays

    def dataset(self, labels: np.ndarray) -> tf.data.Dataset:
        """({row_ids, name: features}, labels) batches, one epoch per iteration."""
        targets = np.asarray(labels, dtype=np.float32)
        specs = {ROW_IDS: tf.TensorSpec((None,), tf.int64)}
        specs |= {
            name: tf.TensorSpec((None, *s.item_shape), tf.as_dtype(s.dtype))
            for name, s in self.streamed.items()
        }

        def examples():
            for ids, arrays in self():
                yield {ROW_IDS: ids, **arrays}, targets[ids]

        signature = (specs, tf.TensorSpec((None, targets.shape[1]), tf.float32))
        dataset = tf.data.Dataset.from_generator(examples, output_signature=signature)
        dataset = dataset.apply(
            tf.data.experimental.assert_cardinality(math.ceil(self.rows / self.batch_size))
        )
        options = tf.data.Options()
        options.autotune.enabled = False  # as heads.train.row_batches: nothing here needs tuning
        return dataset.prefetch(2).with_options(options)


class _Readers:
    """Every streamed cache held open; called with row ids, their rows of each cache."""

    def __init__(self, streamed: dict[str, StreamedFeatures]):
        self.streamed = streamed

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        self.readers = {n: self.stack.enter_context(s.reading()) for n, s in self.streamed.items()}
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)

    def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {n: self.readers[n](self.streamed[n].positions[ids]) for n in self.streamed}


def check_streamable(streamed: dict[str, StreamedFeatures], *, augment: bool) -> None:
    """Refuse what streaming does not do: cached augmented views are not streamed."""
    if streamed and augment:
        names = ", ".join(s.path.name for s in streamed.values())
        raise InputError(
            f"{names}: larger than [train] token_memory_gb, so streamed from disk, and augmenting from "
            "cached views needs them in memory; train without --augment, or raise token_memory_gb"
        )


def check_sweepable(data) -> None:
    """Refuse a sweep over a streamed cache before anything is fitted: its trials train together on
    cached arrays, and its probe start alone would read the whole cache first."""
    streamed = [f.path.name for f in data.features.values() if isinstance(f, StreamedFeatures)]
    if streamed:
        raise InputError(
            f"{', '.join(streamed)}: larger than [train] token_memory_gb, so streamed from disk, and a "
            "sweep trains its trials together on cached arrays; raise token_memory_gb if the machine has "
            "the memory, or train each setting with train-head"
        )
