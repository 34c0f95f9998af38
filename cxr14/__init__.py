"""The ground every folder stands on: the one input error, how a settings table is checked, temporary
files, text helpers, TensorFlow's quiet start, and where data and models come from (the synthetic mark)."""

__version__ = "0.2.0"
