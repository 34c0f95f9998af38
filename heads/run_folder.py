"""A run folder, runs/NAME/: its files, creating or refusing it, its config.json and its model.keras.

Written under a temporary name and renamed when complete, so a failed run never leaves a folder that
blocks its name; a folder holding metrics.json is a finished run.
"""

import contextlib
import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from cxr14.errors import InputError, check_file_name
from cxr14.temps import remove_stale_temps, temp_path

OUTPUTS = (
    "config.json",
    "model.keras",
    "history.csv",
    "predictions.csv",
    "auc.md",
    "roc.png",
    "auc.png",
    "calibration.json",
    "thresholds.json",
    "calibration.png",
    "metrics.json",
)
# Written into every run folder the project makes: --force replaces only folders that hold it.
MARKER = ".cxr14-run"
# Written by some runs only: a head from the user's file keeps the file as trained (heads/custom.py).
SOME_OUTPUTS = ("head_code.py",)
CALIBRATION = "calibration.json"  # per-label calibration fitted on validation (results/calibration.py)
THRESHOLDS = "thresholds.json"  # per-label operating points chosen on validation (results/operating.py)
# What every reader of config.json takes from it, and the JSON type each must have.
CONFIG_KEYS = {"head": dict, "train": dict, "labels": list, "backbones": dict, "feature_dtypes": dict}
# The numbers each label's entry in calibration.json / thresholds.json may hold (lists for isotonic).
DECISION_NUMBERS = ("a", "b", "threshold", "sensitivity", "specificity")
DECISION_LISTS = ("x", "y")


def find_run(run: str | Path, *, runs_dir: Path) -> Path:
    """The run folder `run` names: a path to one, or a run name under `runs_dir` (sweep trials as
    SWEEP/TRIAL)."""
    for candidate in (Path(run), Path(runs_dir) / run):
        if (candidate / "config.json").is_file():
            return candidate
    raise InputError(
        f"no run folder {str(run)!r}: neither {run} nor {Path(runs_dir) / run} holds a run's config.json; "
        f"runs under {runs_dir}: {', '.join(_run_names(Path(runs_dir))) or 'none yet'}"
    )


def _run_names(runs_dir: Path, most: int = 8) -> list[str]:
    names = sorted(p.parent.name for p in runs_dir.glob("*/config.json"))
    return names[:most] + (["..."] if len(names) > most else [])


def run_path(runs_dir: Path, name: str) -> Path:
    """runs_dir/name, for a name that stays inside the runs folder; a runs folder that is a file is refused."""
    check_file_name(name, what="run name (--name)")
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise InputError(f"{runs_dir}: the runs folder (paths.runs_dir, --runs-dir) is a file, not a folder")
    return runs_dir / name


def refuse_existing(run_dir: Path, *, force: bool) -> None:
    """Refuse a finished or non-empty run folder unless `force`, and even then a folder this project did
    not make (no MARKER: a user's own files are never removed); checked before any work starts."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir} is a file, not a run folder; pick another run name")
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return
    if not force:
        raise InputError(f"{run_dir} exists; pick another run name, or overwrite it")
    if not (run_dir / MARKER).is_file():
        raise InputError(
            f"{run_dir} is not a run folder this project made (no {MARKER} in it), so --force does not "
            "overwrite it; pick another run name"
        )


@contextlib.contextmanager
def claim_run(run_dir: Path, *, force: bool) -> Iterator[Path]:
    """Hold the name `run_dir` against every other run, and yield a fresh temporary folder beside it,
    where the run is written until finish_run renames it; the temporary is removed on the way out."""
    with _name_lock(run_dir):
        refuse_existing(run_dir, force=force)  # again, now no other run can finish under this name
        remove_stale_temps(run_dir)  # left by killed runs of the same name
        tmp = temp_path(run_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _name_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on runs/.NAME.lock while a run of NAME works: two runs of one name started
    together cannot both write it. flock, so a killed run's lock goes with its process."""
    lock = run_dir.with_name(f".{run_dir.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(
                f"{run_dir}: another run of this name is being written now; wait for it or pick another name"
            ) from None
        # The holder before us may have removed the file after we opened it: then lock the new one.
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def finish_run(tmp: Path, run_dir: Path) -> Path:
    """Move a complete run into place; only files a run writes are replaced, never a user's own."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("a run folder made by cxr14; --force may replace it\n", encoding="utf-8")
    for name in OUTPUTS + SOME_OUTPUTS:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    # metrics.json last: a run folder holding it is complete.
    for name in sorted(os.listdir(tmp), key=lambda n: n == "metrics.json"):
        os.replace(tmp / name, run_dir / name)
    tmp.rmdir()
    return run_dir


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, default=str, ensure_ascii=False), encoding="utf-8")


def read_config(run_dir: Path) -> dict:
    """A run's config.json, or an error saying the folder is not a run."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{run_dir}: not a run folder (no config.json); train one with run.py train-head")
    config = _read_json(path)
    for key, kind in CONFIG_KEYS.items():
        if not isinstance(config.get(key), kind):
            raise InputError(
                f"{path}: no {key!r} {'table' if kind is dict else 'list'} (a damaged or hand-edited "
                "run file); train the run again"
            )
    return config


def _read_json(path: Path) -> dict:
    """A run file's JSON object, or one line naming the file (cut short, not JSON, not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); train the run again") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: holds a {type(value).__name__}, not a JSON object; train the run again")
    return value


def projection_path(run_dir: Path, backbone: str) -> Path:
    """Where a run trained on a backbone's tokens reduced in channels (map_channels) keeps that projection;
    the name comes from config.json, so one that would lead out of the run folder is refused."""
    check_file_name(backbone, what=f"{Path(run_dir) / 'config.json'}: backbone name")
    return Path(run_dir) / f"projection-{backbone}.npz"


def read_run_projection(run_dir: Path, backbone: str):
    """The channel projection a run keeps for `backbone` (cache.projection.Projection)."""
    from cache.store import read_projection_file  # h5py: this module stays light for the command line

    path = projection_path(run_dir, backbone)
    if not path.is_file():
        raise InputError(
            f"{run_dir} was trained on backbone {backbone!r}'s tokens reduced in channels (map_channels) "
            f"but holds no {path.name} to project new images' tokens alike; train the run again"
        )
    return read_projection_file(path)


def write_decisions(run_dir: Path, decisions: dict) -> None:
    """calibration.json and thresholds.json from {"calibration": ..., "thresholds": ...}."""
    write_json(Path(run_dir) / CALIBRATION, decisions["calibration"])
    write_json(Path(run_dir) / THRESHOLDS, decisions["thresholds"])


def read_decisions(run_dir: Path) -> dict:
    """{"calibration", "thresholds"} of a run; None for each a run made before they existed lacks."""
    found = {}
    for key, name in (("calibration", CALIBRATION), ("thresholds", THRESHOLDS)):
        path = Path(run_dir) / name
        found[key] = _check_decision_file(_read_json(path), path=path) if path.is_file() else None
    return found


def _check_decision_file(value: dict, *, path: Path) -> dict:
    """A calibration or thresholds file whose every label entry holds numbers where numbers belong."""
    labels = value.get("labels")
    if not isinstance(labels, dict):
        raise InputError(f"{path}: no 'labels' table; train the run again")
    for label, entry in labels.items():
        problem = _decision_entry_problem(entry)
        if problem:
            raise InputError(f"{path}: labels[{label!r}] {problem}; train the run again")
    return value


def _decision_entry_problem(entry) -> str:
    """What is wrong with one label's calibration or threshold entry ("" when nothing)."""
    if not isinstance(entry, dict):
        return f"is {entry!r}, not a table"
    for key in DECISION_NUMBERS:
        if entry.get(key) is not None and not _finite(entry[key]):
            return f"{key} = {entry[key]!r} is not a finite number"
    for key in DECISION_LISTS:
        if key in entry and not (isinstance(entry[key], list) and all(map(_finite, entry[key]))):
            return f"{key} = {entry[key]!r} is not a list of finite numbers"
    if len(entry.get("x", ())) != len(entry.get("y", ())):
        return "x and y have different lengths"
    return ""


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_recorded_labels(run_dir: Path, labels: list[str]) -> None:
    """Refuse labels (config.json's) that differ from those the run was scored on at training, in order
    (metrics.json): a hand-edit that swaps two would relabel every output without a word."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return  # an unfinished run is refused where its model is loaded
    scored = _read_json(path).get("labels")
    if isinstance(scored, dict) and list(scored) != list(labels):
        raise InputError(
            f"{Path(run_dir) / 'config.json'}: labels {list(labels)} differ from those the run was trained "
            f"and scored on, in order, in {path.name} ({list(scored)}); the run folder was edited, train it again"
        )


def run_labels(run_dir: Path) -> list[str]:
    """The label names a run was trained on, in its output order."""
    labels = read_config(run_dir).get("labels")
    if not labels:
        raise InputError(
            f"{Path(run_dir) / 'config.json'}: no 'labels' list; the run is incomplete, train it again"
        )
    return list(labels)


def load_model(run_dir: Path):
    """The run's head (a keras.Model) from model.keras, without its training loss (not needed to predict)."""
    import keras  # here, not at the top: finding and refusing run folders needs no TensorFlow
    import numpy as np

    path = Path(run_dir) / "model.keras"
    if not path.is_file():
        raise InputError(
            f"{run_dir}: no model.keras (an unfinished run?); train it again with run.py train-head"
        )
    record = read_config(run_dir).get("head_code")
    objects = {}
    if record is not None:
        from heads.custom import head_objects
        from heads.models import LabelScale

        objects = {**head_objects(run_dir, record), "cxr14>LabelScale": LabelScale}
    try:
        # A head from a file may hold Lambda layers; its code runs anyway, so safe mode guards nothing.
        model = keras.saving.load_model(path, compile=False, custom_objects=objects, safe_mode=record is None)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - Keras raises many types for a bad file; all mean the same
        raise InputError(
            f"{path}: cannot be loaded ({type(err).__name__}: {_first_cause(err)}); train the run again"
        ) from None
    for weight in model.weights:
        # A NaN weight gives NaN probabilities, which every threshold calls negative.
        if not np.isfinite(keras.ops.convert_to_numpy(weight)).all():
            raise InputError(
                f"{path}: weight {weight.path!r} holds NaN or infinite values; train the run again"
            )
    return model


def _first_cause(err: Exception) -> str:
    """One line of a Keras loading error: its own cause where it names one, else its first line."""
    # An unknown layer class reads "<class Functional> could not be deserialized ... config={...}
    # ... Exception encountered: Could not locate class 'Twice'. ..." over many lines.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    cause = next((line for line in lines if line.startswith("Exception encountered:")), lines[0])
    return cause.removeprefix("Exception encountered:").strip()[:300]


def find_reported(runs_dir: Path) -> list[Path]:
    """Every run and sweep folder directly under `runs_dir`."""
    marks = ("metrics.json", "grid.toml", "sweep.json")
    return sorted({p.parent for mark in marks for p in Path(runs_dir).glob(f"*/{mark}")})
