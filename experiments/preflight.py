"""What a command needs on disk, checked before numpy or TensorFlow load (seconds under load), so that a
missing data folder, feature cache, shard folder or run answers at once. Light: paths and JSON only."""

from collections.abc import Sequence
from pathlib import Path

from cache.paths import cache_file, cache_path, refuse_folder
from cxr14.errors import InputError
from dataset.files import find_csv
from experiments.config import Config
from extract.settings import SOURCES
from heads.run_folder import read_config


def check_data(config: Config) -> Path:
    """The data folder's metadata CSV, or the error saying where the data set goes."""
    return find_csv(config.data_dir, config.csv)


def check_feature_files(config: Config, names: Sequence[str]) -> None:
    """Each backbone a [backbones] table or a feature file of one's own, and its feature file present."""
    for name in names:
        check_named(config, name)
        cache_file(config.cache_dir, name)


def check_named(config: Config, name: str) -> None:
    """Refuse a backbone that neither the config nor a feature file in the cache folder names."""
    if name in config.backbones:
        return
    path = cache_path(config.cache_dir, name)
    refuse_folder(path)  # something stands there: say so, not "no such backbone"
    if not path.is_file():
        raise InputError(
            f"no backbone named {name!r}: {config.path} has no [backbones.{name}] table (configured: "
            f"{', '.join(config.backbones) or 'none'}) and there is no feature file {path} "
            "(a file of your own follows cache/README.md)"
        )


def backbone_kind(config: Config, name: str) -> str:
    """What backbone `name`'s cache holds ("features" or "pixels"): from its [backbones] table without
    loading numpy or h5py, or for features of one's own, from the feature file itself."""
    if name in config.backbones:
        return SOURCES[config.backbones[name].source]
    check_named(config, name)
    from cache.store import read_attrs  # h5py: only for a file of one's own

    return read_attrs(cache_path(config.cache_dir, name))["kind"]


def check_run_inputs(config: Config, run_dir: Path) -> None:
    """A run's data folder and the feature files of its backbones, present before its model loads."""
    check_data(config)
    for name in read_config(run_dir).get("backbones", []):
        cache_file(config.cache_dir, name)
