"""What a command trains or scores on: the data set the config names, then the cached features of some
backbones joined to it. The one place that opens both."""

from collections.abc import Sequence

from dataset.load import Dataset, open_dataset
from experiments.config import Config


def open_config_dataset(config: Config) -> Dataset:
    """The index and splits of the config's data folder."""
    return open_dataset(data_dir=config.data_dir, csv=config.csv, labels=config.labels, split=config.split)


def open_run_data(config: Config, *, backbones: Sequence[str], metadata: bool):
    """(data set, HeadData): the index and splits, then each backbone's cache read once and joined by name."""
    from heads.data import load_head_data

    dataset = open_config_dataset(config)
    data = load_head_data(
        cache_dir=config.cache_dir,
        backbones=list(backbones),
        index=dataset.index,
        splits=dataset.splits,
        metadata=metadata,
        synthetic=dataset.synthetic,
        pretrained_on=pretraining(config),
    )
    return dataset, data


def pretraining(config: Config) -> dict[str, tuple[str, ...]]:
    """What each configured backbone's weights were pre-trained on (its table's pretrained_on)."""
    return {name: b.pretrained_on for name, b in config.backbones.items()}
