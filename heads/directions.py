"""Second-order directions: where a label changes the spread of the standardized features, not their mean.

A label that widens (or narrows, or tilts) the spread along some direction leaves the class means equal, so
a linear probe cannot see it, and gradient descent from a random start found no such direction in 6-10
epochs at full size (the probe's AUC, unchanged). The top eigenvectors of the whitened difference of the
class-conditional covariances, Cov(x | y=1) - Cov(x | y=0), point at those directions; the fc head starts
a pair of its first-layer units on each (+v and -v, so the ReLUs see |v.x|), which it then trains as usual.
Validation chooses how many of them join the start (validated_directions), with their units' weights.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from heads.probe import CHUNK, RidgeProbe, one_thread, rank_mean_auc, standardized_chunks

# A direction is kept when its eigenvalue exceeds this multiple of the estimate's own noise level.
SIGNIFICANCE = 1.15
MIN_CLASS_ROWS = 50  # fewer positives (or negatives) than this give covariances too noisy to read


@dataclass(frozen=True, eq=False)
class SpreadMoments:
    """What the directions are read from, whatever the seed: per label the positives' uncentred second
    moments and sums, every row's second moments and their whitening. A learning curve's seeds at 100 %
    train on the same rows and share these (its 14 second-moment products and an eigendecomposition)."""

    second: np.ndarray  # (L, D, D) float32
    first: np.ndarray  # (L, D)
    total: np.ndarray  # (D, D) float32
    whitening: np.ndarray  # (D, k) float32
    positives: np.ndarray  # (L,) positive rows per label
    n: int


def spread_moments(
    blocks: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    rows: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    total: np.ndarray | None = None,
) -> SpreadMoments:
    """One pass over `rows` of the standardized blocks: the sums of SpreadMoments. `total`: every row's
    float32 second moments when known (heads/probe.py NormalEquations.gram32), not summed again."""
    positives = labels[rows] > 0
    second, first, total = _moments_by_label(
        blocks, positives, rows=rows, mean=mean, scale=scale, total=total
    )
    whitening = _whitening(total / len(positives))
    return SpreadMoments(second, first, total, whitening, positives.sum(axis=0).astype(int), len(positives))


def spread_directions(
    moments: SpreadMoments, *, per_label: int = 4, iterations: int = 6, seed: int
) -> np.ndarray:
    """(D, m) unit-ish directions in the standardized space where some label changes the spread
    significantly; m may be 0 (a purely linear signal)."""
    m, n, whitening = moments, moments.n, moments.whitening
    rng = np.random.default_rng(seed)
    found, strength = [], []
    # Cast once: the float32 whitening times the float64 iterates was cast again at every product
    # (~70 % of the power iteration's time); the products, and so the directions, are the same.
    whitening64 = whitening.astype(np.float64)
    for j, n_pos in enumerate(map(int, m.positives)):
        if min(n_pos, n - n_pos) < MIN_CLASS_ROWS:
            continue
        mean_pos, mean_neg = m.first[j] / n_pos, -m.first[j] / (n - n_pos)
        difference = (m.second[j] / n_pos - np.outer(mean_pos, mean_pos)) - (
            (m.total - m.second[j]) / (n - n_pos) - np.outer(mean_neg, mean_neg)
        )
        with one_thread():
            vectors, values = _top_eigen(
                difference, whitening, whitening64, k=per_label, iterations=iterations, rng=rng
            )
        d = whitening.shape[1]
        noise = 2 * np.sqrt(d / n_pos) + d / n_pos  # rough spectral norm of the estimate's own noise
        keep = np.abs(values) > SIGNIFICANCE * noise
        found.append(vectors[:, keep])
        strength += list(np.abs(values[keep]) / noise)
    if not found or not strength:
        return np.zeros((m.first.shape[1], 0), np.float32)
    directions = np.concatenate(found, axis=1)
    return directions[:, np.argsort(strength)[::-1]].astype(np.float32)


def _moments_by_label(blocks, positives: np.ndarray, *, rows, mean, scale, total=None):
    """Per label, the positives' uncentred second moments and sums; and all rows' second moments
    (`total`, when given: those, already summed)."""
    n_labels, dim = positives.shape[1], mean.size
    second = np.zeros((n_labels, dim, dim), np.float32)
    first = np.zeros((n_labels, dim))
    known = total is not None
    total = total if known else np.zeros((dim, dim), np.float32)
    for i, chunk in enumerate(standardized_chunks(blocks, rows, mean=mean, scale=scale)):
        chunk_positives = positives[i * CHUNK : (i + 1) * CHUNK]
        if not known:
            total += chunk.T @ chunk
        for j in range(n_labels):
            picked = chunk[chunk_positives[:, j]]
            if len(picked):
                second[j] += picked.T @ picked
                first[j] += picked.sum(axis=0)
    return second, first, total


def _whitening(covariance: np.ndarray) -> np.ndarray:
    """W with W.T @ covariance @ W = I on the covariance's well-conditioned subspace."""
    with one_thread():
        values, vectors = np.linalg.eigh(covariance.astype(np.float64))
    keep = values > 1e-3 * values.max()
    return (vectors[:, keep] / np.sqrt(values[keep])).astype(np.float32)


def _top_eigen(matrix: np.ndarray, whitening: np.ndarray, whitening64, *, k: int, iterations: int, rng):
    """The k eigenpairs of largest |value| of the whitened matrix (block power iteration), as directions
    in the standardized space. `whitening64`: the whitening as float64."""

    def apply(q):
        # The first iterate is float32 (its product float32, as numpy computes it); the others float64.
        inner = whitening @ q if q.dtype == np.float32 else whitening64 @ q
        return whitening64.T @ (matrix @ inner)

    q = np.linalg.qr(rng.standard_normal((whitening.shape[1], 2 * k)).astype(np.float32))[0]
    for _ in range(iterations):
        q = np.linalg.qr(apply(q))[0]
    values, small = np.linalg.eigh(q.T @ apply(q))
    order = np.argsort(-np.abs(values))[:k]
    return whitening @ (q @ small[:, order]), values[order]


def logistic_with_offset(
    features: np.ndarray, labels: np.ndarray, offset: np.ndarray, *, penalty: float = 1.0
) -> np.ndarray:
    """(m, L): per label, the L2-penalised logistic weights of `features` on top of fixed logits `offset`
    (Newton's method), so the spread units start at their own optimum beside the probe."""
    features = features.astype(np.float64)
    m = features.shape[1]
    weights = np.zeros((m, labels.shape[1]))
    for j in range(labels.shape[1]):
        beta, target = np.zeros(m), labels[:, j]
        for _ in range(20):
            p = expit(offset[:, j] + features @ beta)
            gradient = features.T @ (p - target) + penalty * beta
            hessian = (features * (p * (1 - p))[:, None]).T @ features + penalty * np.eye(m)
            step = np.linalg.solve(hessian, gradient)
            beta -= step
            if np.abs(step).max() < 1e-6:
                break
        weights[:, j] = beta
    return weights


def validated_directions(
    arrays, labels, rows: dict, *, probe: RidgeProbe, directions: np.ndarray, offsets: dict
) -> tuple[np.ndarray, np.ndarray]:
    """The leading directions (1, 2, 4, ... of them, or none) whose units, at their logistic optimum on
    the training rows, give the best validation mean AUC beside the probe; with their (2m, L) weights.

    The noise level in spread_directions is for large samples: on the demo's 1,470 training images it
    kept 16 directions whose units, fitted on train, took the start from the probe's 0.982 to 0.950 on
    validation. Validation chooses their number, as it chooses the probe's penalty.
    """
    none = (directions[:, :0], np.zeros((0, labels.shape[1])))
    if directions.shape[1] == 0:
        return none
    units = {
        split: direction_units(arrays, rows[split], probe=probe, directions=directions) for split in offsets
    }
    val_labels = labels[rows["val"]]
    best, best_auc = none, rank_mean_auc(val_labels, offsets["val"])
    m = directions.shape[1]
    for k in sorted({min(2**i, m) for i in range(m.bit_length() + 1)}):
        pick = np.r_[0:k, m : m + k]  # the +v and -v units of the first k directions
        weights = logistic_with_offset(units["train"][:, pick], labels[rows["train"]], offsets["train"])
        auc = rank_mean_auc(val_labels, offsets["val"] + units["val"][:, pick] @ weights)
        if auc > best_auc:
            best, best_auc = (directions[:, :k], weights), auc
    return best


def direction_units(arrays, rows, *, probe: RidgeProbe, directions: np.ndarray) -> np.ndarray:
    """(len(rows), 2m) the +v / -v ReLU units on the standardized rows."""
    projected = np.concatenate(
        [c @ directions for c in standardized_chunks(arrays, rows, mean=probe.mean, scale=probe.scale)]
    )
    return np.concatenate([np.maximum(projected, 0), np.maximum(-projected, 0)], axis=1)
