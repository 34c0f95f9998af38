"""The reference beside every feature head: a closed-form ridge probe on standardized features, its penalty
chosen by validation mean ROC AUC (as linear-probe evaluations choose theirs on validation).

One Gram matrix of the standardized training rows (float32 chunks summed in float64) and one
eigendecomposition; each penalty of the grid then costs two small products, so the whole probe takes
seconds where a logistic regression per label and penalty would take minutes.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from results.metrics import mean_defined, roc_auc_per_label

CHUNK = 8192
# Penalties as multiples of the training rows: standardized features make the Gram matrix about
# n_train x their correlation matrix, so these span strong shrinkage to almost none.
PENALTIES = tuple(np.logspace(-4, 2, 25))


@dataclass(frozen=True, eq=False)
class RidgeProbe:
    """Scores x -> ((x - mean) / scale) @ weights + bias, one column per label."""

    mean: np.ndarray  # (D,) training mean of the concatenated inputs
    scale: np.ndarray  # (D,) training standard deviation (1 where constant)
    weights: np.ndarray  # (D, L) on standardized inputs
    bias: np.ndarray  # (L,)
    penalty: float  # the chosen penalty / n_train
    val_mean_auc: float

    def scores(self, blocks: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
        """(len(rows), L) float32 ridge scores of `rows` of the blocks (concatenated in order)."""
        weights = self.weights.astype(np.float32)
        parts = [c @ weights for c in standardized_chunks(blocks, rows, mean=self.mean, scale=self.scale)]
        if not parts:
            return np.zeros((0, weights.shape[1]), np.float32)
        return np.concatenate(parts) + self.bias.astype(np.float32)

    def logit_weights(self, *, slope: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kernel, bias) on standardized inputs giving logits slope * score + intercept per label."""
        return self.weights * slope, self.bias * slope + intercept


def moments(blocks: Sequence[np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training mean and standard deviation of the concatenated blocks, in float64; constant columns get 1."""
    sums, squares = [], []
    for block in blocks:
        total, total_sq = np.zeros(block.shape[1]), np.zeros(block.shape[1])
        for start in range(0, len(rows), CHUNK):
            chunk = block[rows[start : start + CHUNK]].astype(np.float64)
            total += chunk.sum(axis=0)
            total_sq += (chunk**2).sum(axis=0)
        sums.append(total)
        squares.append(total_sq)
    n = max(len(rows), 1)
    mean = np.concatenate(sums) / n
    scale = np.sqrt(np.maximum(np.concatenate(squares) / n - mean**2, 0.0))
    scale[scale < 1e-6] = 1.0
    return mean, scale


def standardized_chunks(
    blocks: Sequence[np.ndarray], rows: np.ndarray, *, mean: np.ndarray, scale: np.ndarray
):
    """float32 standardized rows of the concatenated blocks, CHUNK rows at a time."""
    mean32, inverse = mean.astype(np.float32), (1.0 / scale).astype(np.float32)
    for start in range(0, len(rows), CHUNK):
        picked = rows[start : start + CHUNK]
        chunk = np.concatenate([block[picked].astype(np.float32) for block in blocks], axis=1)
        yield (chunk - mean32) * inverse


def fit_ridge_probe(
    blocks: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    penalties: Sequence[float] = PENALTIES,
) -> RidgeProbe:
    """Ridge regression of the 0/1 labels on the standardized blocks; the penalty with the best validation
    mean ROC AUC wins (ties: the stronger penalty)."""
    mean, scale = moments(blocks, train_rows)
    targets = labels[train_rows].astype(np.float64)
    bias = targets.mean(axis=0)
    centered = (targets - bias).astype(np.float32)
    gram = np.zeros((mean.size, mean.size))
    cross = np.zeros((mean.size, labels.shape[1]))
    for i, chunk in enumerate(standardized_chunks(blocks, train_rows, mean=mean, scale=scale)):
        gram += chunk.T @ chunk
        cross += chunk.T @ centered[i * CHUNK : (i + 1) * CHUNK]
    eigenvalues, vectors = np.linalg.eigh(gram)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    projected = vectors.T @ cross
    val_basis = np.concatenate(
        [
            c @ vectors.astype(np.float32)
            for c in standardized_chunks(blocks, val_rows, mean=mean, scale=scale)
        ]
    )
    n = len(train_rows)
    val_labels = labels[val_rows]
    curve = [
        mean_defined(
            roc_auc_per_label(
                val_labels, val_basis @ (projected / (eigenvalues + a * n)[:, None]).astype(np.float32)
            )
        )
        for a in penalties
    ]
    best = int(np.nanargmax(np.asarray(curve)[::-1]))
    best = len(curve) - 1 - best  # the strongest penalty among equals
    penalty = float(penalties[best])
    weights = vectors @ (projected / (eigenvalues + penalty * n)[:, None])
    return RidgeProbe(
        mean=mean, scale=scale, weights=weights, bias=bias, penalty=penalty, val_mean_auc=float(curve[best])
    )


def platt_scaling(
    scores: np.ndarray, labels: np.ndarray, *, iterations: int = 25
) -> tuple[np.ndarray, np.ndarray]:
    """Per label (slope, intercept) with sigmoid(slope * score + intercept) fitted to the labels by Newton's
    method: ridge scores become probabilities, keeping their order (and so every AUC)."""
    n_labels = scores.shape[1]
    slope, intercept = np.ones(n_labels), np.zeros(n_labels)
    for j in range(n_labels):
        x, t = scores[:, j].astype(np.float64), labels[:, j].astype(np.float64)
        spread = max(float(x.std()), 1e-9)
        prior = float(np.clip(t.mean(), 1e-4, 1 - 1e-4))
        theta = np.array([1.0 / spread, np.log(prior / (1 - prior)) - x.mean() / spread])
        design = np.stack([x, np.ones_like(x)], axis=1)
        for _ in range(iterations):
            p = expit(design @ theta)
            gradient = design.T @ (p - t) + 1e-6 * theta
            hessian = (design * (p * (1 - p))[:, None]).T @ design + 1e-6 * np.eye(2)
            step = np.linalg.solve(hessian, gradient)
            theta -= step
            if np.abs(step).max() < 1e-8:
                break
        slope[j], intercept[j] = theta
    return slope, intercept
