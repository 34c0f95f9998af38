"""The reference beside every feature head: a closed-form ridge probe on standardized features, its penalty
chosen by validation mean ROC AUC (as linear-probe evaluations choose theirs on validation).

One Gram matrix of the standardized training rows (float32 chunks summed in float64) and one
eigendecomposition; each penalty of the grid then costs two small products, so the whole probe takes
seconds where a logistic regression per label and penalty would take minutes.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

CHUNK = 8192
# Penalties as multiples of the training rows: standardized features make the Gram matrix about
# n_train x their correlation matrix, so these span strong shrinkage to almost none.
PENALTIES = tuple(np.logspace(-4, 2, 25))


def one_thread():
    """A context in which LAPACK (eigh, Cholesky) runs on one thread. OpenBLAS's threads spin waiting
    for each other, and on a busy CPU that is most of the work: on 2 cores shared with other jobs (load
    average 5), a 2,048-wide eigh took 6.9 s of CPU on 2 threads, 1.7 s on one; a Cholesky solve 0.49
    against 0.17 s. Matrix products are not slowed by the threads, and keep them."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


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
        return _scores(blocks, rows, mean=self.mean, scale=self.scale, weights=self.weights, bias=self.bias)

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


@dataclass(frozen=True, eq=False)
class NormalEquations:
    """The training rows' sums a ridge fit needs: moments, the Gram matrix of the standardized rows and
    their product with the centered labels (float64). The probe and its cross-fitted folds share them."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    gram: np.ndarray  # (D, D)
    cross: np.ndarray  # (D, L)
    target_mean: np.ndarray  # (L,)
    n: int
    # The same Gram matrix summed in float32, as the second-order directions sum theirs
    # (heads/directions.py spread_moments): they take it from here instead of a second pass.
    gram32: np.ndarray | None = None


def normal_equations(
    blocks: Sequence[np.ndarray], labels: np.ndarray, *, rows: np.ndarray
) -> NormalEquations:
    """One pass over `rows` of the blocks: the sums of NormalEquations."""
    mean, scale = moments(blocks, rows)
    targets = labels[rows].astype(np.float64)
    target_mean = targets.mean(axis=0)
    gram32 = np.zeros((mean.size, mean.size), np.float32)
    gram, cross, _ = _sums(blocks, targets - target_mean, rows=rows, mean=mean, scale=scale, gram32=gram32)
    return NormalEquations(mean, scale, gram, cross, target_mean, len(rows), gram32)


def _sums(
    blocks, targets: np.ndarray, *, rows, mean, scale, gram32: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X^T X, X^T targets, column sums of X) of the standardized rows X, float32 chunks summed in float64;
    `gram32`: a float32 array the chunks' X^T X are also summed into."""
    gram = np.zeros((mean.size, mean.size))
    cross = np.zeros((mean.size, targets.shape[1]))
    total = np.zeros(mean.size)
    targets = targets.astype(np.float32)
    for i, chunk in enumerate(standardized_chunks(blocks, rows, mean=mean, scale=scale)):
        product = chunk.T @ chunk
        gram += product
        if gram32 is not None:
            gram32 += product
        cross += chunk.T @ targets[i * CHUNK : (i + 1) * CHUNK]
        total += chunk.sum(axis=0, dtype=np.float64)
    return gram, cross, total


def fit_ridge_probe(
    blocks: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    penalties: Sequence[float] = PENALTIES,
    equations: NormalEquations | None = None,
) -> RidgeProbe:
    """Ridge regression of the 0/1 labels on the standardized blocks; the penalty with the best validation
    mean ROC AUC wins (ties: the stronger penalty). `equations`: the training rows' sums, when known."""
    eq = equations or normal_equations(blocks, labels, rows=train_rows)
    with one_thread():
        eigenvalues, vectors = np.linalg.eigh(eq.gram)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    projected = vectors.T @ eq.cross
    val_basis = np.concatenate(
        [
            c @ vectors.astype(np.float32)
            for c in standardized_chunks(blocks, val_rows, mean=eq.mean, scale=eq.scale)
        ]
    )
    val_labels = labels[val_rows]
    curve = [
        rank_mean_auc(
            val_labels, val_basis @ (projected / (eigenvalues + a * eq.n)[:, None]).astype(np.float32)
        )
        for a in penalties
    ]
    best = int(np.nanargmax(np.asarray(curve)[::-1]))
    best = len(curve) - 1 - best  # the strongest penalty among equals
    penalty = float(penalties[best])
    weights = vectors @ (projected / (eigenvalues + penalty * eq.n)[:, None])
    return RidgeProbe(
        mean=eq.mean,
        scale=eq.scale,
        weights=weights,
        bias=eq.target_mean,
        penalty=penalty,
        val_mean_auc=float(curve[best]),
    )


def rank_auc_per_label(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC per label, NaN where a label has one class: the Mann-Whitney U of one ranking per column
    (tied scores share their mean rank, so a tie counts half, as in scikit-learn's roc_auc_score, which
    it matches to 1e-12: tests/test_probe.py). For the searches inside a fit, on scores they make: the
    penalty search's 25 x 14 roc_auc_score calls were ~23 % of an fc point at full size, this is ~5x
    faster (no input checks, no ROC curve)."""
    from scipy.stats import rankdata

    positive = np.asarray(labels) > 0
    n_pos = positive.sum(axis=0)
    n_neg = len(positive) - n_pos
    ranks = rankdata(scores, axis=0)  # float64, ties averaged
    rank_sums = np.where(positive, ranks, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def rank_mean_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The mean of rank_auc_per_label over the labels with both classes (NaN if none has): what the
    searches inside a fit (the probe's penalty, heads/start.py's directions) compare."""
    auc = rank_auc_per_label(labels, scores)
    defined = auc[~np.isnan(auc)]
    return float(defined.mean()) if defined.size else math.nan


# Folds of the training patients for the probe's out-of-fold scores (heads/start.py).
CROSS_FOLDS = 5


def cross_fitted_scores(
    blocks: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    rows: np.ndarray,
    groups: np.ndarray,
    equations: NormalEquations,
    penalty: float,
    folds: int = CROSS_FOLDS,
) -> np.ndarray:
    """(len(rows), L) ridge scores of each training row from a probe fitted without its patient's rows.

    Patients are split into `folds` groups (GroupKFold); each fold's probe is the full one's normal
    equations minus the fold's own sums, recentred on the rows left, with the same penalty per row. On
    the rows it was fitted on, a probe's scores are better than on any new image; these are not.
    With fewer than two patients there is nothing to hold out and the in-sample scores come back.
    """
    from sklearn.model_selection import GroupKFold

    eq, patients = equations, groups[rows]
    scores = np.empty((len(rows), labels.shape[1]), np.float32)
    n_folds = min(folds, len(np.unique(patients)))
    if n_folds < 2:
        weights = _solve(eq.gram, eq.cross, penalty * eq.n)
        return _scores(blocks, rows, mean=eq.mean, scale=eq.scale, weights=weights, bias=eq.target_mean)
    for _, held in GroupKFold(n_splits=n_folds).split(rows, groups=patients):
        fold = rows[held]
        targets = labels[fold].astype(np.float64) - eq.target_mean
        gram, cross, total = _sums(blocks, targets, rows=fold, mean=eq.mean, scale=eq.scale)
        n_left = eq.n - len(fold)
        mean_left = -total / n_left  # the standardized training rows sum to zero
        label_shift = -targets.sum(axis=0) / n_left  # the rows left's label mean minus the full one
        gram_left = eq.gram - gram - n_left * np.outer(mean_left, mean_left)
        cross_left = eq.cross - cross - n_left * np.outer(mean_left, label_shift)
        weights = _solve(gram_left, cross_left, penalty * n_left)
        bias = eq.target_mean + label_shift - mean_left @ weights
        scores[held] = _scores(blocks, fold, mean=eq.mean, scale=eq.scale, weights=weights, bias=bias)
    return scores


def _solve(gram: np.ndarray, cross: np.ndarray, penalty: float) -> np.ndarray:
    """The ridge weights (gram + penalty I)^-1 cross, by Cholesky."""
    from scipy.linalg import solve

    with one_thread():
        return solve(gram + penalty * np.eye(len(gram)), cross, assume_a="pos")


def _scores(blocks, rows, *, mean, scale, weights, bias) -> np.ndarray:
    w = weights.astype(np.float32)
    parts = [c @ w for c in standardized_chunks(blocks, rows, mean=mean, scale=scale)]
    if not parts:
        return np.zeros((0, w.shape[1]), np.float32)
    return np.concatenate(parts) + bias.astype(np.float32)


def platt_scaling(
    scores: np.ndarray, labels: np.ndarray, *, iterations: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Per label (slope, intercept) with sigmoid(slope * score + intercept) fitted to the labels by damped
    Newton steps on the standardized score (a step that does not lower the loss is halved), with a small
    ridge on the slope: ridge scores become probabilities, keeping their order (and so every AUC). The
    ridge keeps a label whose scores (nearly) separate it finite: out-of-fold scores of 143 training
    images once drove undamped steps to slopes of 6e5."""
    n_labels = scores.shape[1]
    slope, intercept = np.ones(n_labels), np.zeros(n_labels)
    for j in range(n_labels):
        x, t = scores[:, j].astype(np.float64), labels[:, j].astype(np.float64)
        centre, spread = float(x.mean()), max(float(x.std()), 1e-9)
        a, b = _logistic_1d((x - centre) / spread, t, iterations=iterations)
        slope[j], intercept[j] = a / spread, b - a * centre / spread
    return slope, intercept


# The smallest Platt slope, times a label's out-of-fold score spread: its logits then span at least this
# much, far above float32's resolution, so the probe's order (and every AUC) is kept.
MIN_LOGIT_SPREAD = 0.01


def order_keeping(
    slope: np.ndarray, intercept: np.ndarray, *, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Platt (slope, intercept) with every slope positive. A label the probe barely ranks out of fold can
    get a slope of 0 or below; the head's start would then reverse or flatten the probe's order for it
    (measured: -0.005 mean AUC against the probe on a planted problem with weak labels). Such a label
    gets the smallest slope that keeps the order, and the intercept that keeps its mean logit."""
    spread = np.maximum(scores.std(axis=0), 1e-9)
    floor = MIN_LOGIT_SPREAD / spread
    raised = slope < floor
    mean = scores.mean(axis=0)
    intercept = np.where(raised, intercept + (slope - floor) * mean, intercept)
    return np.where(raised, floor, slope), intercept


def _logistic_1d(z: np.ndarray, t: np.ndarray, *, iterations: int) -> tuple[float, float]:
    """(a, b) minimizing the mean log loss of sigmoid(a z + b) plus 1e-3 a^2 / 2, by damped Newton."""
    prior = float(np.clip(t.mean(), 1e-4, 1 - 1e-4))
    theta = np.array([1.0, np.log(prior / (1 - prior))])
    design = np.stack([z, np.ones_like(z)], axis=1)
    ridge = np.diag([1e-3, 1e-9])

    def loss(th):
        logits = design @ th
        return float(np.mean(np.logaddexp(0.0, logits) - t * logits) + 0.5 * th @ ridge @ th)

    current = loss(theta)
    for _ in range(iterations):
        p = expit(design @ theta)
        gradient = design.T @ (p - t) / len(t) + ridge @ theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design / len(t) + ridge
        step = np.linalg.solve(hessian, gradient)
        for _ in range(30):
            trial = theta - step
            if loss(trial) <= current:
                break
            step = step / 2
        theta, previous, current = trial, current, loss(trial)
        if previous - current < 1e-12:
            break
    return float(theta[0]), float(theta[1])
