"""Planted-signal problems for measuring heads: an index shaped like ChestX-ray14 (its prevalence, ~3.6
images per patient, a 70/10/20 patient split) and feature caches whose label signal is known.

Problems: "linear" (each label shifts the mean along its own direction), "nonlinear" (half the labels only
widen the spread along a direction, which no linear probe can see), "complementary" (two caches, A and B
of half its width, each label strong in one and weak in the other), "metadata" (labels depend on age and
view position, and the features carry that confound), "local" (a token map M, LOCAL_TOKENS tokens per
image, whose findings all sit in one token at a place of the image's own, as a nodule can be anywhere; A is
M pooled, the mean of its tokens, where that token's signal is diluted LOCAL_TOKENS-fold). Noise is isotropic plus a few strong latent factors,
with per-dimension scales and offsets, so standardization matters as it does for real embeddings.
"""

from pathlib import Path

import numpy as np

from cache.store import cache_path, write_features
from dataset.index import Index
from dataset.sample import REAL_PREVALENCE
from dataset.settings import LABELS
from dataset.splits import Splits

PROBLEMS = ("linear", "nonlinear", "complementary", "metadata", "local")
LOCAL_TOKENS = 16  # the local problem's 4 x 4 map
LOCAL_STRENGTH = (1.5, 3.0)  # the range of each label's shift in its token (noise: about 1 a coordinate)
IMAGES_PER_PATIENT = 3.64  # 112,120 images of 30,805 patients
CHUNK = 8192


def planted_index(rows: int, *, seed: int, metadata_signal: bool = False) -> tuple[Index, Splits]:
    """An index of `rows` images with ChestX-ray14's label prevalence; with metadata_signal, each label is
    likelier for AP films and older patients (as in the real data, where AP films come from sicker patients)."""
    rng = np.random.default_rng(seed)
    patients = (np.arange(rows) / IMAGES_PER_PATIENT).astype(np.int64)
    age = rng.uniform(1, 95, rows).astype(np.float32)
    view = np.where(rng.random(rows) < 0.6, "PA", "AP").astype(object)
    prevalence = np.array([REAL_PREVALENCE[name] for name in LABELS])
    odds = np.ones(rows)
    if metadata_signal:
        odds = (0.5 + 1.0 * (view == "AP")) * (0.5 + age / 95.0)
    labels = (rng.random((rows, len(LABELS))) < np.clip(prevalence[None, :] * odds[:, None], 0, 0.9)).astype(
        np.uint8
    )
    index = Index(
        csv_path=Path("planted"),
        label_names=LABELS,
        names=np.array([f"{p:08d}_{i:03d}.png" for i, p in enumerate(patients)], dtype=object),
        labels=labels,
        patients=patients,
        follow_up=np.zeros(rows, np.int32),
        age=age,
        sex=np.where(rng.random(rows) < 0.56, "M", "F").astype(object),
        view=view,
        width=np.full(rows, 1024, np.int32),
        height=np.full(rows, 1024, np.int32),
        ages_invalid=0,
    )
    draw = np.random.default_rng(seed + 1).random(patients[-1] + 1)[patients]
    assignment = np.where(draw < 0.7, "train", np.where(draw < 0.8, "val", "test")).astype(object)
    return index, Splits(assignment=assignment, source="patient-random")


def planted_features(
    labels: np.ndarray,
    *,
    dim: int,
    strength: np.ndarray,
    spread: np.ndarray,
    seed: int,
    extra: np.ndarray | None = None,
) -> np.ndarray:
    """(N, dim) float16: noise + labels @ (strength x directions) + a label-gated random amount along the
    spread directions (mean unchanged, variance widened) + `extra` (N, dim) if given."""
    rng = np.random.default_rng(seed)
    n, n_labels = labels.shape
    factors = rng.standard_normal((8, dim)).astype(np.float32) * 0.5
    scale = np.exp(rng.normal(0, 0.7, dim)).astype(np.float32)
    offset = rng.normal(0, 2.0, dim).astype(np.float32)
    directions = rng.standard_normal((n_labels, dim)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    shift = directions * np.asarray(strength, np.float32)[:, None]
    out = np.empty((n, dim), np.float16)
    for start in range(0, n, CHUNK):  # chunks keep float32 temporaries small
        stop = min(start + CHUNK, n)
        y = labels[start:stop].astype(np.float32)
        x = rng.standard_normal((stop - start, dim), dtype=np.float32)
        x += rng.standard_normal((stop - start, len(factors)), dtype=np.float32) @ factors
        x += y @ shift
        x += (
            rng.standard_normal(y.shape, dtype=np.float32) * np.asarray(spread, np.float32) * y
        ) @ directions
        if extra is not None:
            x += extra[start:stop]
        out[start:stop] = x * scale + offset
    return out


def planted_caches(problem: str, *, index: Index, dim: int, seed: int) -> dict[str, np.ndarray]:
    """The feature arrays of `problem` (one of PROBLEMS) for the rows of `index`: {"A": ...} or A and B."""
    rng = np.random.default_rng(1000 + seed)
    n_labels = len(index.label_names)
    strength = rng.uniform(0.5, 1.6, n_labels)
    none = np.zeros(n_labels)
    if problem == "linear":
        return {"A": planted_features(index.labels, dim=dim, strength=strength, spread=none, seed=seed)}
    if problem == "nonlinear":
        widened = rng.permutation(n_labels)[: n_labels // 2]
        spread = np.zeros(n_labels)
        spread[widened] = 2.0
        strength[widened] = 0.0
        return {"A": planted_features(index.labels, dim=dim, strength=strength, spread=spread, seed=seed)}
    if problem == "complementary":
        strong_in_a = rng.permutation(n_labels) < n_labels // 2
        high, low = rng.uniform(0.7, 1.2, n_labels), rng.uniform(0.05, 0.3, n_labels)
        return {
            "A": planted_features(
                index.labels, dim=dim, strength=np.where(strong_in_a, high, low), spread=none, seed=seed
            ),
            "B": planted_features(
                index.labels,
                dim=dim // 2,
                strength=np.where(strong_in_a, low, high),
                spread=none,
                seed=seed + 1,
            ),
        }
    if problem == "local":
        return local_caches(index.labels, channels=local_channels(dim), seed=seed, rng=rng)
    if problem == "metadata":
        confound = rng.standard_normal((2, dim)).astype(np.float32)
        confound /= np.linalg.norm(confound, axis=1, keepdims=True)
        age_z = ((index.age - index.age.mean()) / index.age.std()).astype(np.float32)
        extra = (
            1.5 * (index.view == "AP").astype(np.float32)[:, None] * confound[0]
            + 0.8 * age_z[:, None] * confound[1]
        )
        return {
            "A": planted_features(
                index.labels, dim=dim, strength=strength, spread=none, seed=seed, extra=extra
            )
        }
    raise ValueError(f"unknown planted problem {problem!r}; valid: {', '.join(PROBLEMS)}")


def local_channels(dim: int) -> int:
    """Channels per token of the local problem: an eighth of `dim` (at least 32), so that its map, 16
    tokens, takes twice a `dim`-wide pooled cache (0.9 GB at full size for dim 2,048)."""
    return max(32, dim // 8)


def local_caches(labels: np.ndarray, *, channels: int, seed: int, rng) -> dict[str, np.ndarray]:
    """{"M": (N, LOCAL_TOKENS, channels) float16 tokens, "A": their mean (N, channels)}: every token is
    planted_features' noise; one token per image, drawn at random, also holds its labels' shifts."""
    n = len(labels)
    strength = rng.uniform(*LOCAL_STRENGTH, labels.shape[1])
    site = rng.integers(0, LOCAL_TOKENS, n)
    token_labels = np.zeros((n, LOCAL_TOKENS, labels.shape[1]), np.uint8)
    token_labels[np.arange(n), site] = labels
    flat = token_labels.reshape(n * LOCAL_TOKENS, -1)
    none = np.zeros(labels.shape[1])
    tokens = planted_features(flat, dim=channels, strength=strength, spread=none, seed=seed)
    tokens = tokens.reshape(n, LOCAL_TOKENS, channels)
    pooled = np.empty((n, channels), np.float16)
    for start in range(0, n, CHUNK):
        pooled[start : start + CHUNK] = tokens[start : start + CHUNK].mean(axis=1, dtype=np.float32)
    return {"A": pooled, "M": tokens}


def write_planted_cache(
    cache_dir: Path, name: str, *, index: Index, features: np.ndarray, kind: str = "features"
) -> Path:
    """A synthetic array (features, token maps (N, T, C), or uint8 pixels) written through the feature
    store, every row of `index` present, as an external cache would be."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    if kind == "features" and features.ndim == 3:
        kind = "tokens"
    n = len(index)
    return write_features(
        cache_path(cache_dir, name),
        names=index.names,
        features=features,
        status=np.zeros(n, np.int8),
        errors=np.full(n, "", dtype=object),
        attrs={
            "backbone": name,
            "kind": kind,
            "dtype": str(features.dtype),
            "views": 1,
            "synthetic": True,
        },
    )
