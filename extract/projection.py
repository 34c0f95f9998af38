"""Fitting a token map's channel projection ([backbones.NAME] map_channels): a PCA of the tokens of a
seeded sample of training images, never validation or test ones, so that nothing a head is scored on
shapes its inputs. extract/extraction.py runs the backbone over the sample and projects every image with
the result; cache/projection.py is what the store keeps of it.
"""

import hashlib
from collections.abc import Sequence

import numpy as np
from sklearn.decomposition import PCA

from cache.projection import Projection
from cxr14.errors import InputError


def settings(config: dict) -> tuple[int, int, int]:
    """(channels, fit images, fit seed) of a backbone's recorded settings; channels 0: no projection."""
    return (
        int(config.get("map_channels", 0)),
        int(config.get("map_fit_images", 2000)),
        int(config.get("map_fit_seed", 0)),
    )


def fit_rows(train: np.ndarray | None, *, images: int, seed: int, backbone: str) -> np.ndarray:
    """Rows of the training images the projection is fitted on, in order: a sample of `images` drawn
    with `seed`, or every training row where there are fewer."""
    if train is None:
        raise InputError(
            f"backbones.{backbone}.map_channels: the projection is fitted on training images, but this "
            "extraction was given no split (run.py extract passes the data set's); set map_channels = 0"
        )
    rows = np.flatnonzero(np.asarray(train, dtype=bool))
    if rows.size == 0:
        raise InputError(
            f"backbones.{backbone}.map_channels: the projection is fitted on training images, but none of "
            "the images to extract is in the training split; extract more of the index (--limit), or set "
            "map_channels = 0"
        )
    if rows.size > images:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=images, replace=False))
    return rows


def check_channels(channels: int, *, width: int, backbone: str) -> None:
    """K must be fewer than the map's C channels: a projection onto all of them would only rotate them."""
    if channels >= width:
        raise InputError(
            f"backbones.{backbone}.map_channels = {channels} must be fewer than the map's {width} channels; "
            f"set it below {width}, or 0 to keep them all"
        )


def names_sha256(names: Sequence[str]) -> str:
    """What the fingerprint records of the fit images: which they are, not the names themselves."""
    return hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()


def fit_projection(tokens: np.ndarray, *, channels: int, fit_names, seed: int, backbone: str) -> Projection:
    """The PCA of `tokens` (n, C), each token one sample of C channels, keeping `channels` components."""
    n, width = tokens.shape
    check_channels(channels, width=width, backbone=backbone)
    if n < channels:
        raise InputError(
            f"backbones.{backbone}.map_channels = {channels}: the fit images gave only {n} tokens, fewer "
            "than the channels to keep; raise map_fit_images, extract more images, or keep fewer channels"
        )
    # PCA from the C x C covariance (svd_solver "covariance_eigh": one X.T @ X and an eigh of C x C),
    # since there are many more tokens than channels: no SVD of the 98,000 x 2,048 tokens of 2,000
    # ResNet-50 maps, whose workspace would double their 0.77 GB in float32. IncrementalPCA would hold
    # one batch at a time, but it redoes an SVD of (K + batch) x C per batch: 162 s for 500 such
    # images on 2 busy cores here; this fits all 2,000 in 4.8 s, holding 0.83 GiB beside the 0.37 GiB of
    # float16 tokens (2 cores, synthetic maps of that size). The tokens are centred in float32
    # first: the uncentred Gram matrix of ReLU activations (all positive) loses digits to cancellation.
    x = np.array(tokens, dtype=np.float32)  # a copy of its own, centred in place
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    x -= mean
    pca = PCA(n_components=channels, svd_solver="covariance_eigh").fit(x)
    return Projection(
        mean=(mean + pca.mean_).astype(np.float32),
        components=pca.components_.astype(np.float32),
        explained=pca.explained_variance_ratio_.astype(np.float32),
        fit_names=np.asarray(list(fit_names), dtype=object),
        fit_seed=seed,
    )
