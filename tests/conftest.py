"""A tiny end-to-end project (sample data, config, two offline backbones) shared by the CLI-level tests."""

from pathlib import Path

import pytest

TINY_CONFIG = """
[data]
dir = "data"
[paths]
cache_dir = "features"
runs_dir = "runs"
[backbones.offline_cnn]
source = "random"
image_size = 32
preprocess = "standardize"
width = 8
grid = 2
[backbones.offline_cnn_wide]
source = "random"
image_size = 40
preprocess = "standardize"
seed = 1
width = 8
grid = 3
[backbones.pixels]
source = "pixels"
image_size = 16
preprocess = "bytes"
[train]
epochs = 4
batch_size = 64
lr = 0.01
patience = 2
bootstrap = 50
steps_per_execution = 4
[heads.fc]
units = [16]
dropout = 0.1
[heads.ensemble]
units = [16]
transition = 16
dropout = 0.1
"""


def write_tiny_config(root: Path, extra: str = "") -> Path:
    path = root / "cxr14.toml"
    path.write_text(TINY_CONFIG + extra, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A 200-image sample with both offline backbones extracted; tests copy what they change."""
    from dataset.sample import make_sample
    from experiments.config import load_config
    from experiments.extract import run_extract

    root = tmp_path_factory.mktemp("project")
    config = load_config(write_tiny_config(root))
    make_sample(config.data_dir, images=200, size=64, seed=0, label_names=config.labels)
    run_extract(config, backbones=("offline_cnn", "offline_cnn_wide"))
    return config
