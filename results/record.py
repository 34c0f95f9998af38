"""A run's results on one split: what metrics.json holds. Written and read here only, and versioned, like
the store owns its schema; every table, summary and leaderboard reads a run through read_results."""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from cxr14.errors import InputError

RESULTS_VERSION = 1  # metrics.json written before the version was stamped has this layout too

# The "multilabel" block (results/multilabel.py; absent from files written before it, which still read):
# its metrics in the order tables show them, with the name people read and which way is better.
MULTILABEL_METRICS = {
    "hamming_loss": ("Hamming loss", "lower"),
    "subset_accuracy": ("Subset accuracy", "higher"),
    "f1_samples": ("Example-based F1", "higher"),
    "f1_macro": ("Macro F1", "higher"),
    "lrap": ("Label-ranking average precision", "higher"),
    "coverage_error": ("Coverage error", "lower"),
}


@dataclass(frozen=True)
class LabelResult:
    """One disease on the split: ROC AUC (None when the split holds one class) with its patient-bootstrap
    95 % interval, PR AUC and the counts."""

    auc: float | None
    ci: tuple[float | None, float | None]
    positives: int
    negatives: int
    pr_auc: float | None = None
    defined: bool = True


@dataclass(frozen=True)
class Estimate:
    """A value (None where undefined) and its patient-bootstrap 95 % interval."""

    value: float | None
    ci: tuple[float | None, float | None]


@dataclass(frozen=True)
class MultilabelResult:
    """Multi-label metrics of the run's calls at its operating points: MULTILABEL_METRICS by key, the
    labels that were called (those with a threshold), and the block's other facts (image counts...)."""

    metrics: dict[str, Estimate]
    labels: tuple[str, ...]
    details: dict

    def as_dict(self) -> dict:
        metrics = {name: {"value": e.value, "ci": list(e.ci)} for name, e in self.metrics.items()}
        return {**self.details, "labels": list(self.labels), "metrics": metrics}


@dataclass(frozen=True)
class RunResults:
    split: str
    images: int
    mean_auc: float | None
    mean_ci: tuple[float | None, float | None]
    labels: dict[str, LabelResult]
    details: dict  # the rest of metrics.json: run facts, baselines, decisions, the probe reference, times
    multilabel: MultilabelResult | None = None  # None: a run without operating points, or an older file

    @property
    def sort_key(self) -> float:
        """Best first; a run without a mean AUC sorts last."""
        return -math.inf if self.mean_auc is None else self.mean_auc

    def as_dict(self) -> dict:
        """The JSON document, version first."""
        core = {
            "split": self.split,
            "images": self.images,
            "mean_auc": self.mean_auc,
            "mean_ci": list(self.mean_ci),
            "labels": {name: _label_dict(result) for name, result in self.labels.items()},
        }
        if self.multilabel is not None:
            core["multilabel"] = self.multilabel.as_dict()
        return {"results_version": RESULTS_VERSION, **self.details, **core}


def _label_dict(result: LabelResult) -> dict:
    values = dataclasses.asdict(result)
    values["ci"] = list(result.ci)
    return values


def results_from(metrics: dict, *, source: str) -> RunResults:
    """The record of a metrics dict (as label_metrics and the scoring add to it), or one line naming
    `source` and the key that is missing or of the wrong kind."""
    if not isinstance(metrics, dict):
        raise InputError(
            f"{source}: not a results document (a JSON object); re-run run.py evaluate on the run"
        )
    version = metrics.get("results_version", RESULTS_VERSION)
    if version != RESULTS_VERSION:
        raise InputError(
            f"{source}: results_version {version!r}, this cxr14 reads version {RESULTS_VERSION}; "
            "re-run run.py evaluate on the run with this version"
        )
    if "labels" not in metrics:
        raise InputError(f"{source}: no per-label results ('labels'); re-run run.py evaluate on the run")
    for key in ("images", "mean_auc", "mean_ci"):
        if key not in metrics:
            raise InputError(f"{source}: no {key!r}; re-run run.py evaluate on the run")
    labels = metrics["labels"]
    if not isinstance(labels, dict):
        raise InputError(f"{source}: 'labels' must map each label to its results")
    details = {k: v for k, v in metrics.items() if k not in ("results_version", "labels")}
    for key in ("split", "images", "mean_auc", "mean_ci", "multilabel"):
        details.pop(key, None)
    return RunResults(
        split=str(metrics.get("split", "test")),  # results scored before the split was recorded: test
        images=_count(metrics["images"], key="images", source=source),
        mean_auc=_auc(metrics["mean_auc"], key="mean_auc", source=source),
        mean_ci=_interval(metrics["mean_ci"], key="mean_ci", source=source),
        labels={name: _label(value, name=name, source=source) for name, value in labels.items()},
        details=details,
        multilabel=_multilabel(metrics.get("multilabel"), source=source),
    )


def _multilabel(block, *, source: str) -> MultilabelResult | None:
    if block is None:
        return None
    fix = "re-run run.py evaluate on the run"
    if not isinstance(block, dict) or not isinstance(block.get("metrics"), dict):
        raise InputError(f"{source}: multilabel must hold its 'metrics'; {fix}")
    labels = block.get("labels")
    if not isinstance(labels, list) or not all(isinstance(name, str) for name in labels):
        raise InputError(f"{source}: multilabel.labels = {labels!r} is not a list of label names; {fix}")
    metrics = {
        name: _estimate(
            block["metrics"].get(name),
            key=f"multilabel.metrics.{name}",
            source=source,
            # Coverage error counts labels (1 to the number called); the others are shares.
            high=max(len(labels), 1) if name == "coverage_error" else 1.0,
        )
        for name in MULTILABEL_METRICS
    }
    details = {k: v for k, v in block.items() if k not in ("labels", "metrics")}
    return MultilabelResult(metrics=metrics, labels=tuple(labels), details=details)


def _estimate(value, *, key: str, source: str, high: float) -> Estimate:
    if not isinstance(value, dict) or "value" not in value:
        raise InputError(f"{source}: {key} must hold its 'value'; re-run run.py evaluate on the run")
    ci = value.get("ci", [None, None])
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        raise InputError(f"{source}: {key}.ci = {ci!r} is not an interval [low, high]")
    low, up = (_share(v, key=f"{key}.ci", source=source, high=high) for v in ci)
    return Estimate(_share(value["value"], key=f"{key}.value", source=source, high=high), (low, up))


def _share(value, *, key: str, source: str, high: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not -1e-9 <= value <= high + 1e-9:
        raise InputError(f"{source}: {key} = {value!r} is not a number in [0, {high:g}] or null")
    return min(max(float(value), 0.0), high)


def _label(value, *, name: str, source: str) -> LabelResult:
    key = f"labels.{name}"
    if not isinstance(value, dict) or "auc" not in value:
        raise InputError(f"{source}: {key} must hold the label's 'auc'; re-run run.py evaluate on the run")
    return LabelResult(
        auc=_auc(value["auc"], key=f"{key}.auc", source=source),
        ci=_interval(value.get("ci"), key=f"{key}.ci", source=source),
        positives=_count(value.get("positives", 0), key=f"{key}.positives", source=source),
        negatives=_count(value.get("negatives", 0), key=f"{key}.negatives", source=source),
        pr_auc=_auc(value.get("pr_auc"), key=f"{key}.pr_auc", source=source),
        defined=bool(value.get("defined", value["auc"] is not None)),
    )


def _auc(value, *, key: str, source: str) -> float | None:
    if value is None:
        return None
    # scikit-learn's average precision can land a rounding step above 1 (1.0000000000000002): kept, as 1.
    if isinstance(value, bool) or not isinstance(value, int | float) or not -1e-9 <= value <= 1.0 + 1e-9:
        raise InputError(f"{source}: {key} = {value!r} is not an AUC (a number in [0, 1] or null)")
    return min(max(float(value), 0.0), 1.0)


def _interval(value, *, key: str, source: str) -> tuple[float | None, float | None]:
    if value is None:
        return (None, None)
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise InputError(f"{source}: {key} = {value!r} is not an interval [low, high]")
    low, high = (_auc(v, key=key, source=source) for v in value)
    return (low, high)


def _count(value, *, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{source}: {key} = {value!r} is not a count")
    return value


def write_results(path: Path, metrics: dict) -> Path:
    """metrics.json (or an evaluation's file), checked as it will be read back."""
    path = Path(path)
    record = results_from(metrics, source=str(path))
    path.write_text(json.dumps(record.as_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    return path


def read_results(path: Path) -> RunResults:
    """A run's results file, or one line saying what is wrong with it and what to do."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{path}: no results; train the run with run.py train-head (or run.py evaluate on it)"
        )
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(
            f"{path}: cannot be read as JSON ({error}); re-run run.py evaluate on the run"
        ) from None
    return results_from(metrics, source=str(path))
