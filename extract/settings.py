"""What stage one accepts by name and its settings: backbone sources, each backbone's table and the
[extract] table. The one list of each.

Kept free of TensorFlow, numpy and pandas so that the config and the command line check names at once;
extract/backbones.py loads each source.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cache.settings import FEATURE_DTYPES
from cxr14.errors import InputError
from cxr14.settings import SEED_MAX, allowed, check_ranges
from dataset.settings import NORMALIZATIONS

# Backbone source -> what its cache holds ("features" or "pixels").
SOURCES = {"hub": "features", "keras": "features", "random": "features", "pixels": "pixels"}
# What a backbone's cache keeps of each image ([backbones.NAME] output): "pooled", one vector (what every
# head takes); "map", its last feature map as tokens x channels (kind "tokens", the attention heads' input;
# ResNet-50 at 224 px: 7 x 7 = 49 tokens of 2,048). A map cache still gives the pooled view: heads fit
# their probe on the mean of the tokens, which is the globally pooled vector of a keras.applications net.
OUTPUTS = ("pooled", "map")
# The "random" backbone's stride-2 convolutions: its feature map is image_size / 2**RANDOM_STAGES a side.
RANDOM_STAGES = 3
# import-features: the layouts extract/imported.py reads ("npz": one .npz keyed by image id; "v1-npz" /
# "v1-tfrecord": one file per image, the vector under `embedding`; "hdf5": one group per image, the array
# at a path inside it; "npy": a matrix beside a CSV of names; "parquet": an id column and vector columns).
IMPORT_LAYOUTS = ("npz", "v1-npz", "v1-tfrecord", "hdf5", "npy", "parquet")
# How extract/importing.py turns a row of tokens into one vector ("keep": a token cache, not yet built).
TOKEN_POOLING = ("mean", "flatten", "keep")
# The settings of a map's channel projection ([backbones.NAME] map_channels and its fit): recorded, and
# so fingerprinted, only where a projection is asked for, so map caches made before they existed stay valid.
PROJECTION_KEYS = ("map_channels", "map_fit_images", "map_fit_seed")


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    source: str = allowed(dataclasses.MISSING, choices=tuple(SOURCES))
    image_size: int = allowed(dataclasses.MISSING, low=8, high=2048)
    preprocess: str = allowed(dataclasses.MISSING, choices=NORMALIZATIONS)
    handle: str = ""
    output_key: str = ""
    model: str = ""
    weights: str = "imagenet"
    seed: int = allowed(0, low=0, high=SEED_MAX)
    width: int = allowed(32, low=1, high=1024)
    grid: int = allowed(4, low=1, high=16)
    output: str = allowed("pooled", choices=OUTPUTS)
    # output = "map" only: keep K channels of each token, a PCA fitted on the tokens of `map_fit_images`
    # training images (a sample seeded by `map_fit_seed`; all of them where there are fewer); 0 keeps all.
    map_channels: int = allowed(0, low=0, high=65536)
    map_fit_images: int = allowed(2000, low=1, high=1_000_000)
    map_fit_seed: int = allowed(0, low=0, high=SEED_MAX)
    # What the weights were pre-trained on, e.g. ["ImageNet"]; ChestX-ray14 there marks every result.
    pretrained_on: tuple[str, ...] = ()

    def __post_init__(self):
        check_ranges(self, section=f"backbones.{self.name}")
        check_pretrained_on(self.pretrained_on, key=f"backbones.{self.name}.pretrained_on")
        if self.output == "map" and SOURCES[self.source] != "features":
            raise InputError(
                f'backbones.{self.name}.output = "map" needs a network (source "hub", "keras" or "random"); '
                f'source = "{self.source}" stores the pixels themselves: drop the output key'
            )
        if self.map_channels and self.output != "map":
            raise InputError(
                f"backbones.{self.name}.map_channels = {self.map_channels} projects the tokens of a map, but "
                f'output = "{self.output}" keeps none: set output = "map", or drop map_channels'
            )
        side = -(-self.image_size // 2**RANDOM_STAGES)  # the feature map the grid pools
        if self.source == "random" and self.grid > side:
            raise InputError(
                f"backbones.{self.name}.grid = {self.grid} is larger than the {side}x{side} feature map of "
                f"a {self.image_size}-pixel image; use a grid of at most {side}"
            )

    @property
    def kind(self) -> str:
        """What its cache holds: "features", "tokens" (output = "map") or "pixels"."""
        return "tokens" if self.output == "map" else SOURCES[self.source]

    def as_dict(self) -> dict:
        """The settings that make the features (what extraction records and fingerprints): pretrained_on
        says what the weights saw, which changes no feature, so naming it never invalidates a cache; nor
        does the output key where it is the default "pooled", nor the projection's keys where there is none
        (caches made before they existed stay valid)."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k != "pretrained_on"}
        if self.output == "pooled":
            del settings["output"]
        if not self.map_channels:
            for key in PROJECTION_KEYS:
                del settings[key]
        return settings


def check_pretrained_on(names, *, key: str) -> tuple[str, ...]:
    """A list of distinct, non-empty data set names (for [backbones.NAME] and import-features)."""
    names = tuple(names)
    if any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) != len(names):
        raise InputError(f'{key} = {list(names)} must be distinct data set names, e.g. ["ImageNet"]')
    return names


def check_backbone(b: BackboneConfig, *, path: Path) -> None:
    """The keys a source needs beside the common ones, or an InputError naming the key and the file."""
    section = f"backbones.{b.name}"
    if b.source == "hub" and not b.handle:
        raise InputError(f'{path}: {section}.handle is required when source = "hub"')
    if b.source == "keras" and not b.model:
        raise InputError(
            f'{path}: {section}.model (a keras.applications name) is required when source = "keras"'
        )


@dataclass(frozen=True)
class ExtractConfig:
    batch_size: int = allowed(64, low=1, high=65536)
    shard_size: int = allowed(1024, low=1)
    dtype: str = allowed("float16", choices=FEATURE_DTYPES)
    mixed_precision: bool = False
    xla: bool = False
    views: int = allowed(1, low=1, high=64)
    seed: int = allowed(0, low=0, high=SEED_MAX)
    # Larger images are refused before decoding: a small PNG can decode to gigabytes.
    max_pixels: int = allowed(25_000_000, low=1)

    def __post_init__(self):
        check_ranges(self, section="extract")
