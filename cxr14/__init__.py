"""What both stages share: the config (cxr14.toml parsed once into frozen dataclasses), the one input error,
the join by image name, and where data and models come from (the synthetic-sample mark)."""

__version__ = "0.2.0"
