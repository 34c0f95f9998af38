"""The data set as every command sees it: the index and its splits, and whether it is a synthetic sample
(then its split is never called "official")."""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cxr14.caveats import is_synthetic, synthetic_split_source
from dataset.index import Index, find_csv, read_index
from dataset.settings import SplitConfig
from dataset.splits import Splits, assign_splits


@dataclass(frozen=True)
class Dataset:
    index: Index
    splits: Splits
    synthetic: bool = False  # made by make-sample: results on it are not comparable with published ones


def open_dataset(*, data_dir: Path, csv: str, labels: Sequence[str], split: SplitConfig) -> Dataset:
    """Read the metadata CSV in `data_dir` ("auto" or a file name) and assign splits as `split` says."""
    index = read_index(find_csv(data_dir, csv), label_names=labels)
    splits = assign_splits(
        index,
        data_dir=data_dir,
        policy=split.policy,
        seed=split.seed,
        fractions=split.fractions,
        val_fraction=split.val_fraction,
        frozen_dir=split.frozen_dir,
    )
    synthetic = is_synthetic(data_dir)
    if synthetic:
        splits = dataclasses.replace(splits, source=synthetic_split_source(splits.source))
    return Dataset(index=index, splits=splits, synthetic=synthetic)
