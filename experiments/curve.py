"""Learning curves: heads trained on nested, patient-wise subsets of the training split, features loaded
once, each point chosen on the full validation split and scored on the full test split.

Every seed draws one order of the training patients; a size takes the shortest prefix of whole patients
that reaches it, so the 1 % subset lies inside the 3 % one and a patient's images stay together. Each
point keeps only what the curve shows (test mean AUC with its interval, validation mean AUC, what it was
trained on): its point.json in runs/NAME/LINE/SIZE-seedS/, written atomically once the point is done, so
that a rerun reuses a point only when every setting that made it matches. The features are loaded once
and a subset is a set of row positions into them, never a copy.
"""

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr14.errors import InputError
from cxr14.temps import temp_path
from experiments.config import Config, with_training
from experiments.experiment import RunPlan, plan_run
from experiments.provenance import snapshot
from results.format import format_auc

DEFAULT_FRACTIONS = (0.01, 0.03, 0.1, 0.3, 1.0)
POINT_FILE = "point.json"


@dataclass(frozen=True)
class CurveSize:
    """One size of training subset: a fraction of the training images, or a number of them."""

    fraction: float | None = None
    images: int | None = None

    @property
    def label(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else f"{self.images} images"

    @property
    def slug(self) -> str:
        return f"frac{self.fraction:g}" if self.fraction is not None else f"images{self.images}"

    def target(self, train_images: int) -> int:
        """The images this size asks for out of `train_images`."""
        if self.fraction is not None:
            return max(1, math.ceil(self.fraction * train_images - 1e-9))
        if self.images > train_images:
            raise InputError(
                f"--images {self.images} asks for more than the training split's {train_images:,} images"
            )
        return self.images


def curve_sizes(*, fractions: Sequence[float] | None = None, images: Sequence[int] | None = None):
    """The sizes asked for, smallest first; fractions in (0, 1] or image counts of at least 1, not both."""
    if fractions and images:
        raise InputError("give --fractions or --images, not both")
    if images:
        if any(n < 1 for n in images):
            raise InputError(f"--images must be whole numbers of at least 1, got {list(images)}")
        return tuple(CurveSize(images=int(n)) for n in sorted(set(images)))
    fractions = fractions or DEFAULT_FRACTIONS
    if any(not 0 < f <= 1 for f in fractions):
        raise InputError(f"--fractions must lie in (0, 1], got {list(fractions)}")
    return tuple(CurveSize(fraction=float(f)) for f in sorted(set(fractions)))


def patient_order(patients: np.ndarray, *, seed: int) -> np.ndarray:
    """The distinct patients of `patients`, in an order drawn from `seed`."""
    return np.random.default_rng(seed).permutation(np.unique(patients))


def nested_subsets(patients: np.ndarray, *, sizes: Sequence[CurveSize], seed: int) -> list[np.ndarray]:
    """For each size, positions into `patients` (the training rows' patients) of the shortest prefix of
    whole patients, in the seed's order, holding at least the size's images."""
    order = patient_order(patients, seed=seed)
    ids, counts = np.unique(patients, return_counts=True)
    reached = np.cumsum(counts[np.searchsorted(ids, order)])
    subsets = []
    for size in sizes:
        taken = int(np.searchsorted(reached, size.target(len(patients)))) + 1
        subsets.append(np.flatnonzero(np.isin(patients, order[:taken])))
    return subsets


def point_data(data, *, plan: RunPlan):
    """The loaded data narrowed to a line's backbones and metadata choice: the same arrays, no copy (a
    point's training subset is a set of row positions into them)."""
    return dataclasses.replace(
        data,
        features={name: data.features[name] for name in plan.backbones},
        metadata=data.metadata if plan.train.metadata else None,
        seen_chestxray14=tuple(b for b in data.seen_chestxray14 if b in plan.backbones),
    )


def plan_lines(
    config: Config, *, heads: Sequence[str], backbone_sets: Sequence[str], changes: dict
) -> dict[str, RunPlan]:
    """One plan per head and backbone set (`changes`: training flags for every line), named as a run."""
    plans = {}
    for kind in heads:
        for backbones in backbone_sets:
            plan = plan_run(with_training(config, kind=kind, **changes), kind=kind, backbones=backbones)
            plans.setdefault(plan.default_name(), plan)
    return plans


def run_curve(
    config: Config,
    *,
    heads: Sequence[str],
    backbone_sets: Sequence[str],
    sizes: Sequence[CurveSize],
    seeds: int,
    name: str,
    changes: dict | None = None,
) -> dict:
    """Plan the lines, load every backbone they read once, and draw the curve into runs/NAME/."""
    from experiments.data import open_training_data

    plans = plan_lines(config, heads=heads, backbone_sets=backbone_sets, changes=changes or {})
    backbones = sorted({b for plan in plans.values() for b in plan.backbones})
    _, data = open_training_data(config, backbones=backbones, metadata=True)
    return draw_curve(config, data=data, plans=plans, sizes=sizes, seeds=seeds, name=name)


def draw_curve(config: Config, *, data, plans: dict[str, RunPlan], sizes, seeds: int, name: str) -> dict:
    """Train every point not finished earlier; write curve.json, curve.md and curve.png."""
    from cxr14.tf_logging import models_built_in_a_loop

    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}")
    start = time.perf_counter()
    curve_dir = config.runs_dir / name
    curve_dir.mkdir(parents=True, exist_ok=True)
    train = data.rows("train")
    first = config.train.seed
    subsets = {
        seed: nested_subsets(data.patients[train], sizes=sizes, seed=seed)
        for seed in range(first, first + seeds)
    }
    _check_splits(data, label_names=config.labels)
    jobs = [(line, size, seed) for line in plans for size in range(len(sizes)) for seed in subsets]
    points, shared = [], SharedFit()
    with models_built_in_a_loop():
        for i, (line, k, seed) in enumerate(jobs, 1):
            rows = train[subsets[seed][k]]
            step = f"[{i}/{len(jobs)}] {line} {sizes[k].label} seed {seed}"
            points.append(
                _run_point(
                    config, data, curve_dir / line / f"{sizes[k].slug}-seed{seed}", plans[line],
                    size=sizes[k], seed=seed, rows=rows, step=step, shared=shared,
                )
            )  # fmt: skip
    return write_curve(curve_dir, name=name, data=data, points=points, seconds=time.perf_counter() - start)


def _check_splits(data, *, label_names) -> None:
    """What train-head checks of the data, once for every point: the labels, and a validation split that
    can choose (some label with both classes)."""
    from heads.scoring import check_labels

    check_labels(data, label_names)
    val = data.labels[data.rows("val")]
    if not ((val.sum(axis=0) > 0) & (val.sum(axis=0) < len(val))).any():
        raise InputError(
            f"no label has both classes in the val split ({len(val)} images), so no point can be chosen "
            "on it; use more images or a larger val_fraction"
        )


def _run_point(
    config, data, point_dir: Path, plan: RunPlan, *, size, seed: int, rows, step: str, shared
) -> dict:
    """One point's record: trained now, or read back when a finished point has the same settings."""
    plan = dataclasses.replace(plan, train=dataclasses.replace(plan.train, seed=seed).sized_for(rows.size))
    narrowed = point_data(data, plan=plan)
    run_snapshot = snapshot(config, plan, caches=narrowed.caches, synthetic=narrowed.synthetic)
    settings = point_settings(run_snapshot, size=size, seed=seed, names=data.names[rows])
    done = _finished_point(point_dir, settings)
    if done is not None:
        print(f"{step}: finished earlier, test mean AUC {format_auc(done['test_mean_auc'])}", flush=True)
        return done
    split_rows = {"train": rows, "val": data.rows("val"), "test": data.rows("test")}
    point = _point_record(
        plan,
        size=size,
        seed=seed,
        labels=data.labels[rows],
        patients=data.patients[rows],
        names=config.labels,
    )
    point |= train_point(narrowed, plan=plan, rows=split_rows, n_labels=len(config.labels), shared=shared)
    point_dir.mkdir(parents=True, exist_ok=True)
    write_point(point_dir / POINT_FILE, {"settings": settings, "point": point})
    print(
        f"{step}: {point['images']:,} images, {point['patients']:,} patients; test mean AUC "
        f"{format_auc(point['test_mean_auc'], point['test_mean_ci'])} ({point['seconds']:.0f} s)",
        flush=True,
    )
    return point


class SharedFit:
    """What points that train on the same rows share: at 100 % every seed trains on the whole training
    split. A head whose fit does not depend on the seed (the closed-form linear probe, with no
    second-order directions) is fitted once, the seeds differing only in their bootstrap draws; any other
    feature head's start fits its seed-independent part once (heads/start.py fit_common_start: the probe
    and its penalty search, its cross-fit, the directions' moments), each seed then drawing its own
    directions and training."""

    def __init__(self):
        self.key, self.fitted = None, None
        self.common_key, self.common = None, None

    @staticmethod
    def seedless(plan: RunPlan) -> bool:
        from heads.settings import kind_of, start_directions

        spec = kind_of(plan.head)
        closed_form = spec.takes == "features" and not spec.hidden and plan.train.start == "probe"
        return closed_form and not plan.head.builder and start_directions(plan.head, plan.train) == 0

    def fit(self, data, *, plan: RunPlan, rows: dict, n_labels: int):
        from heads.train import fit

        rows_key = hashlib.sha256(rows["train"].tobytes()).hexdigest()
        key = (plan.default_name(), rows_key)
        if self.seedless(plan) and key == self.key:
            return self.fitted
        start = self.start(data, plan=plan, rows=rows, rows_key=rows_key)
        fitted = fit(
            data, rows=rows, head=plan.head, train=plan.train, n_labels=n_labels, progress=False,
            shared_start=start,
        )  # fmt: skip
        self.key, self.fitted = (key, fitted) if self.seedless(plan) else (None, None)
        return fitted

    def start(self, data, *, plan: RunPlan, rows: dict, rows_key: str):
        """A feature head's start (None for a pixel head), its seed-independent part fitted once for the
        same inputs and training rows."""
        from heads.settings import kind_of, start_directions
        from heads.start import fit_common_start, fit_start

        if kind_of(plan.head).takes != "features":
            return None
        directions = start_directions(plan.head, plan.train)
        key = (tuple(data.features), data.metadata is not None, rows_key)
        if key != self.common_key or (directions > 0 and self.common.spread is None):
            self.common_key, self.common = None, None  # the last one's memory freed before the next
            self.common = fit_common_start(data, rows=rows, directions=directions > 0)
            self.common_key = key
        return fit_start(data, rows=rows, max_directions=directions, seed=plan.train.seed, common=self.common)


def train_point(data, *, plan: RunPlan, rows: dict, n_labels: int, shared: SharedFit) -> dict:
    """A point's head fitted on rows["train"] (positions into `data`, chosen on rows["val"]) and its
    figures: the test mean AUC with its patient-bootstrap interval and the validation mean AUC, computed
    as train-head computes them for metrics.json; none of a run's other outputs (operating points,
    calibration, baselines, files), which a curve does not show."""
    from heads.scoring import predict_probabilities
    from heads.train import MONITOR
    from results.metrics import bootstrap_auc, mean_defined, roc_auc_per_label

    start = time.perf_counter()
    fitted = shared.fit(data, plan=plan, rows=rows, n_labels=n_labels)
    # Every row, in train-head's chunks: a row's float32 probabilities then match its run's to the bit.
    scores = predict_probabilities(fitted.model, data, np.arange(len(data.names)))[rows["test"]]
    labels, patients = data.labels[rows["test"]], data.patients[rows["test"]]
    interval = [math.nan, math.nan]
    if plan.train.bootstrap > 0:
        boot = {"n_boot": plan.train.bootstrap, "seed": plan.train.seed}
        interval = bootstrap_auc(labels, scores, groups=patients, **boot)["mean"]
    history = fitted.history
    return {
        "test_mean_auc": _finite(mean_defined(roc_auc_per_label(labels, scores))),
        "test_mean_ci": [_finite(v) for v in interval],
        "val_mean_auc": float(history[MONITOR].to_numpy()[history["chosen"].to_numpy()][0]),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _finite(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _point_record(plan: RunPlan, *, size: CurveSize, seed: int, labels, patients, names) -> dict:
    """What a point is trained on: its images, patients and positives per label (none: listed)."""
    positives = labels.sum(axis=0).astype(int)
    return {
        "line": plan.default_name(),
        "size": size.label,
        "seed": seed,
        "images": int(len(labels)),
        "patients": int(len(np.unique(patients))),
        "positives": dict(zip(names, map(int, positives), strict=True)),
        "no_positives": [n for n, p in zip(names, positives, strict=True) if p == 0],
    }


def point_settings(run_snapshot: dict, *, size: CurveSize, seed: int, names) -> dict:
    """Everything that makes a point: the run's settings and caches (not the rest of the config: another
    head's preset does not change this one), its size, seed and the very training images it drew."""
    kept = {k: v for k, v in run_snapshot.items() if k != "config"}
    digest = hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()
    settings = kept | {"size": dataclasses.asdict(size), "seed": seed, "train_images_sha256": digest}
    return json.loads(json.dumps(settings, default=str))  # as it reads back from point.json


def _finished_point(point_dir: Path, settings: dict) -> dict | None:
    path = point_dir / POINT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # trained again, and the file rewritten whole
    return saved["point"] if saved.get("settings") == settings else None


def write_point(path: Path, value: dict) -> None:
    """Written to a temporary name and renamed: a killed run never leaves half a point.json."""
    tmp = temp_path(path)
    tmp.write_text(json.dumps(value, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def write_curve(curve_dir: Path, *, name: str, data, points: list[dict], seconds: float) -> dict:
    """curve.json, curve.md and curve.png from the points, with a fit per line and the baselines."""
    from heads.scoring import data_notice
    from results.baselines import CHANCE_AUC
    from results.curve import curve_lines, fit_power_law, format_curve, plot_curve, summarize_points

    summary = summarize_points(points)
    fits = {
        line: fit_power_law([r["images"] for r in rows], [math.nan if r["test_mean_auc"] is None else r["test_mean_auc"] for r in rows])
        for line, rows in curve_lines(summary).items()
    }  # fmt: skip
    curve = {"notice": data_notice(data)} if data_notice(data) else {}
    curve |= {
        "name": name,
        "order": "one seeded order of patients per seed; prefixes of whole patients, so sizes are nested",
        "train_images": int(data.rows("train").size),
        "summary": summary,
        "fits": fits,
        "metadata_baseline": metadata_baseline(data),
        "chance_auc": CHANCE_AUC,
        "points": points,
        "seconds": round(seconds, 1),
    }
    write_point(curve_dir / "curve.json", curve)
    text = format_curve(curve)
    (curve_dir / "curve.md").write_text(text, encoding="utf-8")
    plot_curve(curve, curve_dir / "curve.png")
    return {**curve, "curve_dir": curve_dir, "summary_text": text + f"\nwritten to {curve_dir}"}


def metadata_baseline(data) -> dict:
    """The metadata-only baseline fitted on the full training split, its test mean AUC (no interval)."""
    from results.baselines import metadata_baseline_scores
    from results.metrics import mean_defined, roc_auc_per_label

    if data.covariates is None:
        return {}
    test = data.rows("test")
    scores = metadata_baseline_scores(data.covariates, data.labels, train_rows=data.rows("train"), rows=test)
    mean = mean_defined(roc_auc_per_label(data.labels[test], scores))
    return {"mean_auc": None if math.isnan(mean) else mean, "fitted_on": "the full training split"}
