"""A token map's channel projection as the store keeps it: what stage one fitted on training images and
applied to every token, stored in the feature file beside the tokens it made (format: cache/README.md).

numpy only: extract/projection.py fits it, cache/store.py reads and writes it and checks it here.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr14.errors import InputError

METHOD = "pca"
# The file's datasets, by the field of Projection each holds.
DATASETS = {
    "mean": "projection_mean",
    "components": "projection_components",
    "explained": "projection_explained",
    "fit_names": "projection_fit_names",
}


@dataclass(frozen=True, eq=False)
class Projection:
    """Stored tokens are (x - mean) @ components.T of the backbone's tokens x of C channels."""

    mean: np.ndarray  # (C,) float32
    components: np.ndarray  # (K, C) float32, orthonormal rows
    explained: np.ndarray  # (K,) float32, each component's share of the fit tokens' variance
    fit_names: np.ndarray  # (n,) object str: the training images it was fitted on
    fit_seed: int

    @property
    def channels(self) -> int:
        return int(self.components.shape[0])

    @property
    def map_channels(self) -> int:
        return int(self.components.shape[1])

    def apply(self, tokens: np.ndarray) -> np.ndarray:
        """(..., C) tokens as (..., K) float32."""
        return (np.asarray(tokens, np.float32) - self.mean) @ self.components.T

    def digest(self) -> str:
        """SHA-256 of the arrays and names: every shard of one file must carry the same projection."""
        h = hashlib.sha256()
        for array in (self.mean, self.components, self.explained):
            h.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
        h.update("\0".join(map(str, self.fit_names)).encode())
        return h.hexdigest()

    def attrs(self) -> dict:
        """The `projection` attribute: what the arrays are and what they were fitted on."""
        return {
            "method": METHOD,
            "channels": self.channels,
            "map_channels": self.map_channels,
            "fit_images": len(self.fit_names),
            "fit_seed": self.fit_seed,
            "fit_split": "train",
            "sha256": self.digest(),
        }


def from_arrays(path: Path, *, attrs: dict, arrays: dict) -> Projection:
    """The projection a file stores (its `projection` attribute and DATASETS), checked for shape and
    digest; an InputError naming the file and what is wrong otherwise."""
    missing = [name for name in DATASETS.values() if name not in arrays]
    if missing:
        raise InputError(
            f"{path}: attribute projection is set but dataset(s) {missing} are missing; a projected token "
            "file stores its projection whole (cache/README.md): extract it again"
        )
    fields = {field: arrays[name] for field, name in DATASETS.items()}
    projection = Projection(
        mean=np.asarray(fields["mean"], np.float32),
        components=np.asarray(fields["components"], np.float32),
        explained=np.asarray(fields["explained"], np.float32),
        fit_names=np.asarray(fields["fit_names"], dtype=object),
        fit_seed=int(attrs.get("fit_seed", 0)),
    )
    check_shapes(path, projection, attrs=attrs)
    if attrs.get("sha256") != projection.digest():
        raise InputError(
            f"{path}: its projection's arrays do not hash to the projection attribute's sha256, so they "
            "were changed after they were written; extract it again from scratch"
        )
    return projection


def check_shapes(path: Path, projection: Projection, *, attrs: dict, channels: int | None = None) -> None:
    """mean (C,), components (K, C), explained (K,), as many fit names as fit_images; K == `channels`
    (the features' last axis) when given."""
    c, k = projection.mean.shape, projection.components.shape
    if projection.mean.ndim != 1 or len(k) != 2 or k[1] != c[0] or projection.explained.shape != (k[0],):
        raise InputError(
            f"{path}: projection shapes mean {c}, components {k}, explained {projection.explained.shape} "
            "do not fit together; they must be (C,), (K, C) and (K,) (cache/README.md)"
        )
    declared = (attrs.get("channels"), attrs.get("map_channels"), attrs.get("fit_images"))
    if declared != (k[0], k[1], len(projection.fit_names)):
        raise InputError(
            f"{path}: projection attribute declares channels, map_channels, fit_images = {declared} but "
            f"its datasets hold {(k[0], k[1], len(projection.fit_names))}; extract it again"
        )
    if channels is not None and channels != k[0]:
        raise InputError(
            f"{path}: features have {channels} channels but the projection makes {k[0]}; the tokens were "
            "not made by this projection: extract it again"
        )
