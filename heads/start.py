"""Where a feature head starts: the ridge probe (also the run's reference), the inputs' training
standardization, and, for heads that look for it, the directions of second-order signal.

With train.start = "probe" the head's logit is the probe's (Platt-scaled, frozen) plus what its own
layers add, and those layers start at zero; so a head begins exactly at the reference and training can
only move it where validation says it helps (measured: without this start, fc lost 0.02-0.09 mean AUC to
the probe at full size). In training, each training row's probe logit is out-of-fold (cross-fitted by
patient, heads/probe.py): the probe fitted on a row fits it better than it will fit a new image, and a
head adding to those in-sample logits saw a training loss of 2e-6 from its first epoch and learned
nothing. Validation, test and prediction use the probe fitted on all training rows.
With train.start = "none" the head starts from its seeded random layers on the standardized inputs, as
the blog trained its heads; the probe is still fitted, as the reference beside it.
"""

from dataclasses import dataclass, field

import numpy as np

from cache.stream import StreamedFeatures, chunk_rows
from heads.data import METADATA_INPUT, HeadData
from heads.directions import SpreadMoments, spread_directions, spread_moments, validated_directions
from heads.probe import (
    RidgeProbe,
    cross_fitted_scores,
    fit_ridge_probe,
    normal_equations,
    order_keeping,
    platt_scaling,
)


@dataclass(frozen=True, eq=False)
class HeadStart:
    inputs: dict[str, int]  # input name -> width, in the probe's block order
    probe: RidgeProbe
    kernel: np.ndarray  # (D, L) shortcut logits on the standardized concatenated inputs
    bias: np.ndarray  # (L,)
    directions: np.ndarray  # (D, m) second-order directions (m may be 0)
    direction_weights: np.ndarray  # (2m, L) logits of the units on +v and -v
    # (n_train, L) out-of-fold minus in-sample probe logit of each training row, in rows["train"] order:
    # what training adds to the shortcut's logits so that the head sees honest residuals.
    train_correction: np.ndarray
    # Per token input: each channel's sd over the training rows' tokens. Tokens are standardized by it,
    # not by the pooled vector's sd, which is up to sqrt(T) times smaller and would blow the tokens up
    # into the attention gates' saturation (heads/models.py rescales the shortcut's input to match).
    token_scales: dict[str, np.ndarray] = field(default_factory=dict)

    def moments(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean, variance) of input `name` on the training rows, for its Normalization layer."""
        offset = 0
        for other, width in self.inputs.items():
            if other == name:
                scale = self.probe.scale[offset : offset + width]
                return self.probe.mean[offset : offset + width], scale**2
            offset += width
        raise KeyError(name)


def probe_blocks(data: HeadData, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The plain view of every feature cache, then the metadata columns: what the probe and heads read;
    of `rows` alone where given (the rows a probe scores). A token cache's block is the mean of its tokens:
    the pooled vector, which the probe is fitted on."""
    blocks, _ = _blocks(data, rows=rows, scale_rows=None)
    return blocks


def _blocks(data: HeadData, *, rows, scale_rows) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """probe_blocks, and with `scale_rows` each token cache's token scale over them, from the same pass."""
    blocks, scales = {}, {}
    for name in data.features:
        plain = data.features[name][:, 0] if data.views(name) > 1 else data.features[name]
        if data.is_tokens(name):
            blocks[name], scales[name] = pool_tokens(plain, rows=rows, scale_rows=scale_rows)
        else:
            blocks[name] = plain if rows is None else _take(plain, rows)
    if data.metadata is not None:
        blocks[METADATA_INPUT] = data.metadata if rows is None else data.metadata[rows]
    return blocks, scales


def mean_tokens(tokens: np.ndarray) -> np.ndarray:
    """(N, T, C) -> (N, C) float32, the mean over tokens (pool_tokens)."""
    pooled, _ = pool_tokens(tokens)
    return pooled


def pool_tokens(tokens, *, rows=None, scale_rows=None) -> tuple[np.ndarray, np.ndarray | None]:
    """One pass over token maps (N, T, C), a chunk of rows at a time (cache.stream.chunk_rows: no float32
    copy of the whole cache, and a streamed one read once, within its budget): (len(rows), C) float32, the
    mean over tokens of each of `rows` (every row when None); and with `scale_rows` (rows of the cache
    among them), (C,) float32, each channel's sd over every token of those rows (None without)."""
    rows = np.arange(len(tokens)) if rows is None else np.asarray(rows)
    channels = tokens.shape[-1]
    pooled = np.empty((len(rows), channels), np.float32)
    counted = None if scale_rows is None else np.isin(rows, scale_rows)
    total, squares = np.zeros(channels, np.float64), np.zeros(channels, np.float64)
    step = chunk_rows(tokens, itemsize=8)  # a chunk's float16 part, its float32 copy and a subset of it
    for begin in range(0, len(rows), step):
        wanted = rows[begin : begin + step]
        # A run of consecutive rows is read as a slice: a streamed cache reads it in one piece.
        part = tokens[wanted[0] : wanted[-1] + 1] if _consecutive(wanted) else tokens[wanted]
        values = np.asarray(part, dtype=np.float32)  # converted once, for the mean and the squares
        pooled[begin : begin + step] = values.mean(axis=1)
        if counted is not None:
            kept = counted[begin : begin + step]
            flat = (values if kept.all() else values[kept]).reshape(-1, channels)
            total += flat.sum(axis=0, dtype=np.float64)  # float64 sums: billions of values at full size
            squares += np.einsum("ij,ij->j", flat, flat, dtype=np.float64)
    if counted is None:
        return pooled, None
    count = max(1, int(counted.sum()) * tokens.shape[-2])
    variance = np.maximum(squares / count - np.square(total / count), 0.0)
    return pooled, np.sqrt(np.where(variance > 0, variance, 1.0)).astype(np.float32)


def _take(features, rows: np.ndarray):
    """`rows` of features: still on disk for a streamed cache (read a chunk at a time where used)."""
    return features.take(rows) if isinstance(features, StreamedFeatures) else features[rows]


def _consecutive(rows: np.ndarray) -> bool:
    return len(rows) > 0 and rows[-1] - rows[0] == len(rows) - 1 and bool((np.diff(rows) == 1).all())


@dataclass(frozen=True, eq=False)
class CommonStart:
    """The part of a start its seed does not change: the probe (its penalty searched on validation), its
    cross-fit and Platt scaling, and what the directions are read from. Points that train on the same rows
    (a learning curve's seeds at 100 %) fit it once: fit_start then gives each seed what fitting it
    whole would have (tests/test_start.py)."""

    inputs: dict[str, int]
    arrays: list[np.ndarray]  # probe_blocks' arrays, in order (a token cache's: pooled once, kept)
    probe: RidgeProbe
    kernel: np.ndarray
    bias: np.ndarray
    train_correction: np.ndarray
    offsets: dict[str, np.ndarray]  # the probe's logits: out-of-fold on "train", the full probe's on "val"
    token_scales: dict[str, np.ndarray]
    spread: SpreadMoments | None  # None: no head asked for directions


def fit_common_start(data: HeadData, *, rows: dict, directions: bool) -> CommonStart:
    """The probe on the training rows and what a start takes from it; `directions`: also the moments
    the second-order directions are read from."""
    # The token caches' pooled vectors and scales in one pass (a streamed cache is read once here).
    blocks, token_scales = _blocks(data, rows=None, scale_rows=rows["train"])
    arrays = list(blocks.values())
    labels = data.labels
    equations = normal_equations(arrays, labels, rows=rows["train"])
    probe = fit_ridge_probe(
        arrays, labels, train_rows=rows["train"], val_rows=rows["val"], equations=equations
    )
    honest = cross_fitted_scores(
        arrays, labels, rows=rows["train"], groups=data.patients, equations=equations, penalty=probe.penalty
    )
    # Calibrated on the out-of-fold scores: those are distributed as the probe's scores of new images.
    slope, intercept = order_keeping(*platt_scaling(honest, labels[rows["train"]]), scores=honest)
    kernel, bias = probe.logit_weights(slope=slope, intercept=intercept)
    # The probe's logits: out-of-fold on "train" (what a head's own layers add to), the full probe's on "val".
    offsets = {
        "train": honest * slope + intercept,
        "val": probe.scores(arrays, rows["val"]) * slope + intercept,
    }
    train_correction = (slope * (honest - probe.scores(arrays, rows["train"]))).astype(np.float32)
    spread = None
    if directions:
        spread = spread_moments(
            arrays, labels, rows=rows["train"], mean=probe.mean, scale=probe.scale, total=equations.gram32
        )
    return CommonStart(
        inputs={name: array.shape[1] for name, array in blocks.items()},
        arrays=arrays,
        probe=probe,
        kernel=kernel,
        bias=bias,
        train_correction=train_correction,
        offsets=offsets,
        token_scales=token_scales,
        spread=spread,
    )


def fit_start(
    data: HeadData, *, rows: dict, max_directions: int, seed: int, common: CommonStart | None = None
) -> HeadStart:
    """The probe on the training rows (penalty chosen on validation) and what a head starts from.
    `common`: fit_common_start's for these data and rows, when the caller has it."""
    if common is None or (max_directions > 0 and common.spread is None):
        common = fit_common_start(data, rows=rows, directions=max_directions > 0)
    probe = common.probe
    directions = np.zeros((probe.mean.size, 0), np.float32)
    if max_directions > 0:
        directions = spread_directions(common.spread, seed=seed)[:, :max_directions]
    directions, weights = validated_directions(
        common.arrays, data.labels, rows, probe=probe, directions=directions, offsets=common.offsets
    )
    return HeadStart(
        inputs=common.inputs,
        probe=probe,
        kernel=common.kernel,
        bias=common.bias,
        directions=directions,
        direction_weights=weights,
        train_correction=common.train_correction,
        token_scales=common.token_scales,
    )
