"""Second-order directions: where a label changes the spread of the standardized features, not their mean.

A label that widens (or narrows, or tilts) the spread along some direction leaves the class means equal, so
a linear probe cannot see it, and gradient descent from a random start found no such direction in 6-10
epochs at full size (the probe's AUC, unchanged). The top eigenvectors of the whitened difference of the
class-conditional covariances, Cov(x | y=1) - Cov(x | y=0), point at those directions; the fc head starts
a pair of its first-layer units on each (+v and -v, so the ReLUs see |v.x|), which it then trains as usual.
"""

from collections.abc import Sequence

import numpy as np
from scipy.special import expit

from heads.probe import CHUNK, one_thread, standardized_chunks

# A direction is kept when its eigenvalue exceeds this multiple of the estimate's own noise level.
SIGNIFICANCE = 1.15
MIN_CLASS_ROWS = 50  # fewer positives (or negatives) than this give covariances too noisy to read


def spread_directions(
    blocks: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    rows: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    per_label: int = 4,
    iterations: int = 6,
    seed: int,
) -> np.ndarray:
    """(D, m) unit-ish directions in the standardized space where some label changes the spread
    significantly; m may be 0 (a purely linear signal)."""
    positives = labels[rows] > 0
    n, n_labels = positives.shape
    second, first, total = _moments_by_label(blocks, positives, rows=rows, mean=mean, scale=scale)
    whitening = _whitening(total / n)
    rng = np.random.default_rng(seed)
    found, strength = [], []
    for j in range(n_labels):
        n_pos = int(positives[:, j].sum())
        if min(n_pos, n - n_pos) < MIN_CLASS_ROWS:
            continue
        mean_pos, mean_neg = first[j] / n_pos, -first[j] / (n - n_pos)
        difference = (second[j] / n_pos - np.outer(mean_pos, mean_pos)) - (
            (total - second[j]) / (n - n_pos) - np.outer(mean_neg, mean_neg)
        )
        vectors, values = _top_eigen(difference, whitening, k=per_label, iterations=iterations, rng=rng)
        d = whitening.shape[1]
        noise = 2 * np.sqrt(d / n_pos) + d / n_pos  # rough spectral norm of the estimate's own noise
        keep = np.abs(values) > SIGNIFICANCE * noise
        found.append(vectors[:, keep])
        strength += list(np.abs(values[keep]) / noise)
    if not found or not strength:
        return np.zeros((mean.size, 0), np.float32)
    directions = np.concatenate(found, axis=1)
    return directions[:, np.argsort(strength)[::-1]].astype(np.float32)


def _moments_by_label(blocks, positives: np.ndarray, *, rows, mean, scale):
    """Per label, the positives' uncentred second moments and sums; and all rows' second moments."""
    n_labels, dim = positives.shape[1], mean.size
    second = np.zeros((n_labels, dim, dim), np.float32)
    first = np.zeros((n_labels, dim))
    total = np.zeros((dim, dim), np.float32)
    for i, chunk in enumerate(standardized_chunks(blocks, rows, mean=mean, scale=scale)):
        chunk_positives = positives[i * CHUNK : (i + 1) * CHUNK]
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


def _top_eigen(matrix: np.ndarray, whitening: np.ndarray, *, k: int, iterations: int, rng) -> tuple:
    """The k eigenpairs of largest |value| of the whitened matrix (block power iteration), as directions
    in the standardized space."""

    def apply(q):
        return whitening.T @ (matrix @ (whitening @ q))

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
