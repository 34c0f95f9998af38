"""What both stages share: the config (cxr14.toml parsed once into frozen dataclasses) and the one input error."""

__version__ = "0.2.0"
