"""A tiny end-to-end project (sample data, config, two offline backbones) shared by the CLI-level tests."""

import pytest


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A 200-image sample with both offline backbones extracted; tests copy what they change."""
    from dataset.sample import make_sample
    from experiments.config import load_config
    from experiments.extract import run_extract
    from tests.fixtures import write_tiny_config

    root = tmp_path_factory.mktemp("project")
    config = load_config(write_tiny_config(root))
    make_sample(config.data_dir, images=200, size=64, seed=0, label_names=config.labels)
    run_extract(config, backbones=("offline_cnn", "offline_cnn_wide"))
    return config
