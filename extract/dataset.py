"""The data set as every command sees it: the index and its splits, from the config."""

from dataclasses import dataclass

from cxr14.config import Config
from extract.index import Index, find_csv, read_index
from extract.splits import Splits, assign_splits


@dataclass(frozen=True)
class Dataset:
    index: Index
    splits: Splits


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
    return Dataset(index=index, splits=splits)
