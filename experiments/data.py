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
        # What each configured backbone's weights were pre-trained on (its table's pretrained_on).
        pretrained_on={name: b.pretrained_on for name, b in config.backbones.items()},
        token_memory_gb=config.train.token_memory_gb,
    )
    return dataset, data


def open_training_data(config: Config, *, backbones: Sequence[str], metadata: bool):
    """open_run_data for a head about to train: each cache also checked against the config's table for
    its backbone, on the attributes the load read (a cache's attributes are read once)."""
    from experiments.provenance import check_made_by

    dataset, data = open_run_data(config, backbones=backbones, metadata=metadata)
    check_made_by(config, data.caches)
    return dataset, data
