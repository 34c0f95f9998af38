"""The data set as every command sees it: the index and its splits, from the config, and whether it is
a synthetic sample (then its split is never called "official")."""

import dataclasses
from dataclasses import dataclass

from cxr14.caveats import is_synthetic, synthetic_split_source
from cxr14.config import Config
from extract.index import Index, find_csv, read_index
from extract.splits import Splits, assign_splits


@dataclass(frozen=True)
class Dataset:
    index: Index
    splits: Splits
    synthetic: bool = False  # made by make-sample: results on it are not comparable with published ones


def open_dataset(config: Config) -> Dataset:
    """Read the metadata CSV and assign splits as the config says."""
    index = read_index(find_csv(config.data_dir, config.csv), label_names=config.labels)
    split = config.split
    splits = assign_splits(
        index,
        data_dir=config.data_dir,
        policy=split.policy,
        seed=split.seed,
        fractions=split.fractions,
        val_fraction=split.val_fraction,
        frozen_dir=split.frozen_dir,
    )
    synthetic = is_synthetic(config.data_dir)
    if synthetic:
        splits = dataclasses.replace(splits, source=synthetic_split_source(splits.source))
    return Dataset(index=index, splits=splits, synthetic=synthetic)
