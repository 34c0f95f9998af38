"""A run folder, runs/NAME/: its files, creating or refusing it, its config.json and its model.keras.

Written under a temporary name and renamed when complete, so a failed run never leaves a folder that
blocks its name; a folder holding metrics.json is a finished run.
"""

import json
import os
import shutil
from pathlib import Path

from cxr14.errors import InputError
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
# Written by some runs only: a head from the user's file keeps the file as trained (heads/custom.py).
SOME_OUTPUTS = ("head_code.py",)
CALIBRATION = "calibration.json"  # per-label calibration fitted on validation (results/calibration.py)
THRESHOLDS = "thresholds.json"  # per-label operating points chosen on validation (results/operating.py)


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


def refuse_existing(run_dir: Path, *, force: bool) -> None:
    """Refuse a finished or non-empty run folder unless `force`; checked before any work starts."""
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise InputError(f"{run_dir} exists; pick another run name, or overwrite it")


def start_run(run_dir: Path, *, force: bool) -> Path:
    """A fresh temporary folder beside run_dir, where the run is written until finish_run renames it."""
    refuse_existing(run_dir, force=force)
    remove_stale_temps(run_dir)  # left by killed runs of the same name
    tmp = temp_path(run_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_run(tmp: Path, run_dir: Path) -> Path:
    """Move a complete run into place; only files a run writes are replaced, never a user's own."""
    run_dir.mkdir(parents=True, exist_ok=True)
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
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err}); train the run again") from None


def write_decisions(run_dir: Path, decisions: dict) -> None:
    """calibration.json and thresholds.json from {"calibration": ..., "thresholds": ...}."""
    write_json(Path(run_dir) / CALIBRATION, decisions["calibration"])
    write_json(Path(run_dir) / THRESHOLDS, decisions["thresholds"])


def read_decisions(run_dir: Path) -> dict:
    """{"calibration", "thresholds"} of a run; None for each a run made before they existed lacks."""
    found = {}
    for key, name in (("calibration", CALIBRATION), ("thresholds", THRESHOLDS)):
        path = Path(run_dir) / name
        try:
            found[key] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err}); train the run again") from None
    return found


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
        return keras.saving.load_model(path, compile=False, custom_objects=objects, safe_mode=record is None)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - Keras raises many types for a bad file; all mean the same
        raise InputError(
            f"{path}: cannot be loaded ({type(err).__name__}: {_first_cause(err)}); train the run again"
        ) from None


def _first_cause(err: Exception) -> str:
    """One line of a Keras loading error: its own cause where it names one, else its first line."""
    # An unknown layer class reads "<class Functional> could not be deserialized ... config={...}
    # ... Exception encountered: Could not locate class 'Twice'. ..." over many lines.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    cause = next((line for line in lines if line.startswith("Exception encountered:")), lines[0])
    return cause.removeprefix("Exception encountered:").strip()[:300]
