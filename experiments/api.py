"""Stage two from Python (a notebook, a script): cached features as numpy and pandas, and a head trained
from a builder function with the command line's machinery and run folder.

    from experiments import api
    project = api.open_project("cxr14.toml", workdir="demo")
    cached = api.load_features(project, backbones=["offline_cnn"])
    result = api.train_head(project, head="examples/gated_heads.py:gated_attention", backbones=["offline_cnn"])

The entry point for people: below it, library code stays keyword-only and config-free.
"""

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.errors import InputError
from experiments.config import Config, load_config, with_training


@dataclass(frozen=True, eq=False)
class Features:
    """Cached features of some backbones joined with the data set; every row in the same order."""

    names: np.ndarray  # (N,) image names
    features: dict[str, np.ndarray]  # backbone -> (N, D) (or (N, K, D) with K cached views)
    labels: pd.DataFrame  # (N, L) 0/1, indexed by image name
    split: np.ndarray  # (N,) "train" | "val" | "test", patient-wise
    patients: np.ndarray  # (N,) patient ids
    metadata: pd.DataFrame  # (N, 6) age scaled, age missing, sex and view position one-hot

    def rows(self, split: str) -> np.ndarray:
        """Positions of the rows in `split`."""
        return np.flatnonzero(self.split == split)


def open_project(
    config: str | Path = "cxr14.toml",
    *,
    workdir: str | Path | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
) -> Config:
    """The config file, with its folders moved: `workdir` as the demo lays it out (data, features, runs),
    or each folder on its own."""
    project = load_config(Path(config))
    if workdir is not None:
        workdir = Path(workdir)
        data_dir, cache_dir, runs_dir = (
            data_dir or workdir / "data",
            cache_dir or workdir / "features",
            runs_dir or workdir / "runs",
        )
    folders = {"data_dir": data_dir, "cache_dir": cache_dir, "runs_dir": runs_dir}
    return dataclasses.replace(project, **{k: Path(v) for k, v in folders.items() if v is not None})


def load_features(project: Config, *, backbones: Sequence[str]) -> Features:
    """Each backbone's cache read once and joined by image name with labels, splits, patients, metadata."""
    from experiments.data import open_training_data
    from heads.data import METADATA_COLUMNS

    _, data = open_training_data(project, backbones=list(backbones), metadata=True)
    return Features(
        names=data.names,
        features=dict(data.features),
        labels=pd.DataFrame(data.labels, index=data.names, columns=list(project.labels)),
        split=data.split,
        patients=data.patients,
        metadata=pd.DataFrame(data.covariates, index=data.names, columns=list(METADATA_COLUMNS)),
    )


def train_head(
    project: Config,
    *,
    head: str | Callable,
    backbones: Sequence[str],
    name: str | None = None,
    options: dict | None = None,
    force: bool = False,
    **settings,
) -> dict:
    """Train and score a head as `run.py train-head` does, into the project's runs folder; returns the
    metrics (with "run_dir" and a text "summary").

    `head`: a built-in kind, a [heads.NAME] table, "FILE.py:FUNCTION", or the builder function itself
    (defined in a .py file: the run keeps that file). `settings`: [train] and head keys, e.g. epochs=5.
    """
    from experiments.experiment import run_train_head

    kind = head if isinstance(head, str) else builder_of(head)
    changes = {**settings, **({"options": dict(options)} if options else {})}
    project = with_training(project, kind=kind, **changes)
    return run_train_head(project, kind=kind, backbones=list(backbones), name=name, force=force)


def builder_of(function: Callable) -> str:
    """ "FILE.py:FUNCTION" of a builder function, which must live in a file of its own the run can keep."""
    source = inspect.getsourcefile(function)
    name = getattr(function, "__name__", repr(function))
    if (
        function.__module__ == "__main__"
        or not source
        or not source.endswith(".py")
        or not Path(source).is_file()
    ):
        raise InputError(
            f"head function {name!r} is not defined in a module file (a notebook cell or the script being run); "
            'put it in a .py file and pass head="FILE.py:FUNCTION" (the run keeps a copy of that file)'
        )
    return f"{source}:{name}"
