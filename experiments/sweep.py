"""Head sweeps: every combination of a TOML grid trained on features loaded once, chosen on validation."""

import dataclasses
import gc
import itertools
import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from cxr14.caveats import SYNTHETIC_NOTICE, seen_notice
from cxr14.errors import InputError
from cxr14.settings import read_toml
from cxr14.tf_logging import models_built_in_a_loop
from experiments.config import Config, with_training
from experiments.experiment import RunPlan, plan_run, sized_for_data
from experiments.provenance import snapshot
from heads.run_folder import run_path
from heads.settings import FILE_HEAD, describe_settings, head_kind, is_file_head, kind_of, start_directions
from results.format import MISSING, format_auc, format_difference
from results.record import read_results

# Grid keys and the type of one value; every key but those in [fixed] holds a list of values.
GRID_KEYS = {
    "head": str,
    "backbone": str,
    "units": list,
    "dropout": float,
    "transition": int,
    "fusion": str,
    "lr": float,
    "loss": str,
    "start": str,  # where feature heads start: "probe" or "none"
    "metadata": bool,
    "augment": bool,
    "epochs": int,
    "batch_size": int,
    "seed": int,
    "patience": int,
    "options": dict,  # keyword options of a head from your own file, e.g. [{width = 64}, {width = 128}]
}
REQUIRED = ("head", "backbone")
# More combinations than this are refused unless --max-trials says so: a grid of six axes of ten values is
# 10**6 trials (years of training) and is a mistake far more often than a plan.
MAX_TRIALS = 1000


def _value(value, kind: type, *, key: str, path: Path):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise InputError(f"{path}: {key} values must be lists of integers, e.g. [[512, 256], [256]]")
        return tuple(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputError(f"{path}: {key} value {value!r} must be {kind.__name__}")
    if key.endswith("head") and is_file_head(value):  # a head file is found from the grid's folder
        match = FILE_HEAD.fullmatch(value)
        return f"{path.resolve().parent / match['file']}:{match['function']}"
    return value


def read_grid(path: Path) -> tuple[dict[str, list], dict]:
    """The grid's axes (key -> list of values, file order) and its [fixed] options."""
    path = Path(path)
    raw = read_toml(path, what="grid file")
    fixed_raw = raw.pop("fixed", {})
    if not isinstance(fixed_raw, dict):
        raise InputError(f"{path}: fixed must be a table ([fixed])")
    for key in [*raw, *fixed_raw]:
        if key not in GRID_KEYS:
            raise InputError(f"{path}: unknown grid key {key!r} (valid: {', '.join(GRID_KEYS)})")
    axes = {}
    for key, values in raw.items():
        if not isinstance(values, list) or not values:
            raise InputError(f"{path}: {key} must be a non-empty list of values to try, got {values!r}")
        axes[key] = [_value(v, GRID_KEYS[key], key=key, path=path) for v in values]
    fixed = {key: _value(v, GRID_KEYS[key], key=f"fixed.{key}", path=path) for key, v in fixed_raw.items()}
    for key in REQUIRED:
        if key not in axes and key not in fixed:
            raise InputError(f"{path}: the grid needs {key!r} (a list of values, or one value under [fixed])")
    for key, values in [*axes.items(), *((k, [v]) for k, v in fixed.items())]:
        for value in values:
            check_alone(key, value, path=path)
    both = sorted(set(axes) & set(fixed))
    if both:
        raise InputError(f"{path}: {both[0]!r} is both a grid axis and in [fixed]; keep one")
    return axes, fixed


def check_alone(key: str, value, *, path: Path) -> None:
    """Refuse a grid value that is invalid whatever it is combined with, naming the key and what it takes."""
    from heads.settings import HEAD_FIELDS, HEAD_KINDS, HeadConfig, TrainConfig

    try:
        if key == "head":
            if isinstance(value, str) and is_file_head(value):
                return  # a head of one's own: its file and function are checked when its trial is planned
            head_kind(value)
        elif key in HEAD_FIELDS:
            HeadConfig(kind="grid", **{key: value})
        elif key != "backbone":
            TrainConfig(**{key: value})
    except InputError as err:
        allowed = f"one of {', '.join(HEAD_KINDS)}" if key == "head" else str(err).replace("heads.grid.", "")
        raise InputError(
            f"{path}: {key} value {value!r} is not allowed ({allowed}); nothing was trained"
        ) from None


def check_backbones(config: Config, axes: dict, fixed: dict, *, path: Path) -> None:
    """Refuse a backbone the config does not know and the cache folder does not hold, before training."""
    from experiments.experiment import backbone_kind

    values = axes.get("backbone", []) + ([fixed["backbone"]] if "backbone" in fixed else [])
    for value in values:
        for name in (b.strip() for b in str(value).split(",") if b.strip()):
            try:
                backbone_kind(config, name)
            except InputError as err:
                raise InputError(f"{path}: backbone value {value!r}: {err}") from None


def check_grid_size(axes: dict[str, list], *, most: int, path: Path) -> int:
    """The number of combinations of `axes`, or an InputError when it is more than `most`."""
    count = math.prod(len(values) for values in axes.values())
    if count > most:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in axes.items())
        raise InputError(
            f"{path}: the grid has {count:,} combinations ({sizes}), more than the {most:,} trials a sweep "
            "runs; shrink the grid, or raise the cap with --max-trials"
        )
    return count


def expand_grid(axes: dict[str, list], fixed: dict) -> list[dict]:
    """Every combination of the axes, each merged with the fixed options."""
    keys = list(axes)
    return [{**fixed, **dict(zip(keys, combo, strict=True))} for combo in itertools.product(*axes.values())]


def trial_name(combo: dict, *, axes: Sequence[str]) -> str:
    """A readable folder name from the values the grid varies, e.g. fc-units512-256-dropout0.5-lr0.001.

    The same combination keeps its folder across resumes."""
    head = str(combo["head"])
    parts = [FILE_HEAD.fullmatch(head)["function"] if is_file_head(head) else head]
    for key in axes:
        value = combo[key]
        if key == "head":
            continue
        if isinstance(value, dict):
            parts.append("-".join(f"{k}{v}" for k, v in value.items()))
        if key == "backbone":
            parts.append("+".join(b.strip() for b in str(value).split(",") if b.strip()))
        elif isinstance(value, bool):
            parts.append(key if value else f"no{key}")
        elif isinstance(value, tuple | list):
            parts.append(key + "-".join(map(str, value)))
        else:
            parts.append(f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}")
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", "-".join(parts))


def plan_trials(
    config: Config, combos: list[dict], *, axes: Sequence[str]
) -> tuple[dict[str, RunPlan], list[str]]:
    """Resolve combinations into distinct plans; combinations that make no sense are skipped with why."""
    plans, skipped = {}, []
    for combo in combos:
        settings = {k: v for k, v in combo.items() if k not in REQUIRED}
        try:
            trial_config = with_training(config, kind=combo["head"], **settings)
            plan = plan_run(trial_config, kind=combo["head"], backbones=combo["backbone"])
        except InputError as err:
            skipped.append({"combination": combo, "reason": str(err)})
            continue
        plans.setdefault(trial_name(combo, axes=axes), plan)
    return plans, skipped


def _trial_data(data, plan: RunPlan):
    """The loaded data narrowed to a trial's backbones and metadata choice (no copy of the arrays)."""
    return dataclasses.replace(
        data,
        features={name: data.features[name] for name in plan.backbones},
        metadata=data.metadata if plan.train.metadata else None,
        seen_chestxray14=tuple(b for b in data.seen_chestxray14 if b in plan.backbones),
    )


# What a finished trial must share with the trial planned now to be reused: all that made it, from
# the head and its training to the caches' fingerprints (config.json, heads/run_folder.py).
SAME_SETTINGS = ("head", "train", "decision", "labels", "backbones", "feature_dtypes", "caches")


def _finished(trial_dir: Path, *, snapshot_now: dict) -> tuple[dict | None, str]:
    """A finished trial's metrics when it was trained with the settings planned now, else None and why
    it is trained again ("" when it never finished)."""
    try:
        if not (trial_dir / "metrics.json").is_file():
            return None, ""
        metrics = read_results(trial_dir / "metrics.json").as_dict()
        saved = json.loads((trial_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, InputError) as err:
        return None, f"its files are damaged ({type(err).__name__})"
    now = json.loads(json.dumps(snapshot_now, default=str, ensure_ascii=False))
    changed = [key for key in SAME_SETTINGS if saved.get(key) != now.get(key)]
    if changed:
        return None, f"its {', '.join(changed)} settings differ from the grid's now"
    if not isinstance(metrics, dict) or "mean_auc" not in metrics:
        return None, "its metrics.json is incomplete"
    return metrics, ""


def _planned_grid(config: Config, *, grid_path: Path, max_trials: int) -> tuple[list, dict, list]:
    """(combinations, plans by trial, skipped): the grid checked, expanded and planned before any work."""
    axes, fixed = read_grid(grid_path)
    check_grid_size(axes, most=max_trials, path=grid_path)
    check_backbones(config, axes, fixed, path=grid_path)
    combos = expand_grid(axes, fixed)
    plans, skipped = plan_trials(config, combos, axes=list(axes))
    if not plans:
        reasons = sorted({s["reason"] for s in skipped})
        raise InputError(f"{grid_path}: no valid combination to train; every one was skipped: {reasons}")
    return combos, plans, skipped


def run_sweep(config: Config, *, grid_path: Path, name: str, max_trials: int = MAX_TRIALS, data=None) -> dict:
    """Train every trial not already finished, rank by validation mean AUC, test only the winner.
    `data`: the training data already loaded for every backbone of the grid, with metadata (bench sweep);
    None loads it here."""
    from experiments.data import open_training_data
    from heads.outputs import plot_finished_run
    from heads.scoring import score_run
    from heads.stream import check_sweepable
    from results.report import write_auc_table

    sweep_dir = run_path(config.runs_dir, name)
    combos, plans, skipped = _planned_grid(config, grid_path=grid_path, max_trials=max_trials)
    backbones = sorted({b for plan in plans.values() for b in plan.backbones})
    if data is None:  # one load for every trial: all trials then also see exactly the same rows
        _, data = open_training_data(config, backbones=backbones, metadata=True)
    check_sweepable(data)
    plans = {trial: sized_for_data(plan, data) for trial, plan in plans.items()}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(grid_path, sweep_dir / "grid.toml")
    print(
        f"sweep {name}: {len(plans)} trials ({len(combos)} combinations, {len(skipped)} skipped)", flush=True
    )
    with models_built_in_a_loop():
        results = _run_trials(config, data, sweep_dir, plans)

    ranked = sorted(results, key=lambda t: _sort_key(results[t]["mean_auc"]), reverse=True)
    winner, winner_plan = ranked[0], plans[ranked[0]]
    verdicts = versus_winner(
        data,
        {t: sweep_dir / t for t in ranked},
        winner=winner,
        n_boot=winner_plan.train.bootstrap,
        seed=winner_plan.train.seed,
    )
    # Only the winner's plots: eight trials' ROC, AUC and calibration figures cost more than a trial's
    # own scoring, for folders nobody opens after the leaderboard has ranked them.
    plot_finished_run(sweep_dir / winner, data=_trial_data(data, winner_plan), label_names=config.labels)
    test = score_run(
        run_dir=sweep_dir / winner,
        data=_trial_data(data, winner_plan),
        split="test",
        n_boot=winner_plan.train.bootstrap,
        seed=winner_plan.train.seed,
        keep_predictions=True,
    )
    write_auc_table(
        test, sweep_dir / "winner-test-auc.md", label_names=config.labels, run_name=f"{name}/{winner}"
    )
    board = format_leaderboard(
        name=name, ranked=ranked, plans=plans, results=results, test=test, skipped=skipped, verdicts=verdicts
    )
    (sweep_dir / "leaderboard.md").write_text(board, encoding="utf-8")
    summary = _sweep_summary(ranked=ranked, results=results, test=test, skipped=skipped, verdicts=verdicts)
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return {**summary, "summary": board + f"\nwritten to {sweep_dir}"}


def val_scores(trial_dir: Path, data):
    """A trial's validation probabilities from its predictions.csv, in the order of data's val rows."""
    import numpy as np  # here: a grid is checked before numpy loads
    import pandas as pd

    path = trial_dir / "predictions.csv"
    names = data.names[data.rows("val")]
    table = pd.read_csv(path).set_index("name")
    missing = names[~pd.Index(names).isin(table.index)]  # hashed: setdiff1d sorts strings, seconds a trial
    if missing.size:
        raise InputError(
            f"{path}: no prediction for {missing.size} validation images (e.g. {missing[0]}); the trial was "
            "trained on other rows: delete its folder and run the sweep again to retrain it"
        )
    return table.loc[names, list(data.label_names)].to_numpy(np.float64)


def versus_winner(data, trial_dirs: dict, *, winner: str, n_boot: int, seed: int) -> dict:
    """Each trial's validation mean AUC minus the winner's, with a paired patient-bootstrap interval and
    whether it is tied with the winner (the interval reaches 0: the winner does not beat it beyond noise)."""
    from results.metrics import mean_differences_against

    val = data.rows("val")
    scores = {trial: val_scores(path, data) for trial, path in trial_dirs.items()}
    verdicts = mean_differences_against(
        data.labels[val], scores, scores[winner], groups=data.patients[val], n_boot=n_boot, seed=seed
    )
    for trial, verdict in verdicts.items():
        high = verdict["ci"][1]
        verdict["tied"] = trial != winner and (high is None or high >= 0.0)
    return verdicts


def _sweep_summary(*, ranked: list[str], results: dict, test: dict, skipped: list, verdicts: dict) -> dict:
    """sweep.json: the winner, its validation and test figures, every trial's validation mean AUC and its
    difference to the winner's."""
    notice = {"notice": test["notice"]} if test.get("notice") else {}
    return notice | {
        "winner": ranked[0],
        "val_mean_auc": results[ranked[0]]["mean_auc"],
        "test_mean_auc": test["mean_auc"],
        "test_mean_ci": test["mean_ci"],
        "test_beats_metadata": test["baselines"]["beats_metadata"],
        "trials": {t: results[t]["mean_auc"] for t in ranked},
        "versus_winner": {t: verdicts[t] for t in ranked},
        "tied_with_winner": [t for t in ranked if verdicts[t]["tied"]],
        "kept_probe": [t for t in ranked if results[t].get("kept_probe")],
        "kept_start": [t for t in ranked if results[t].get("kept_start")],
        "skipped": skipped,
    }


class SharedStarts:
    """What every trial over one backbone set shares, fitted once: the ridge probe with its penalty search
    and the second-order directions (heads/start.py). Keyed by what fit_start depends on."""

    def __init__(self, data):
        self.data, self.fitted = data, {}

    def for_plan(self, plan: RunPlan):
        from heads.start import fit_start

        if kind_of(plan.head).takes != "features":
            return None
        directions = start_directions(plan.head, plan.train)
        key = (plan.backbones, plan.train.metadata, directions, plan.train.seed)
        if key not in self.fitted:
            data = _trial_data(self.data, plan)
            rows = {split: data.rows(split) for split in ("train", "val", "test")}
            self.fitted[key] = fit_start(data, rows=rows, max_directions=directions, seed=plan.train.seed)
        return self.fitted[key]


def _run_trials(config: Config, data, sweep_dir: Path, plans: dict[str, RunPlan]) -> dict:
    """Every trial's validation metrics, in plan order: read back where an earlier run finished it, else
    trained, those that see the same batches together (heads/group.py), the others alone."""
    starts = SharedStarts(data)
    results, todo = {}, {}
    for i, (trial, plan) in enumerate(plans.items(), 1):
        pending = Pending(trial, plan, snapshot(config, plan, caches=data.caches, synthetic=data.synthetic))
        pending.step = f"[{i}/{len(plans)}] {trial}"
        done, pending.why = _finished(sweep_dir / trial, snapshot_now=pending.settings)
        if done is not None:
            print(
                f"{pending.step}: finished earlier, val mean AUC {format_auc(done['mean_auc'])}", flush=True
            )
            results[trial] = done
        else:
            todo[trial] = pending
    for group in group_trials(list(todo.values())):
        trained = _train_group if len(group) > 1 else _train_alone
        results |= _released(trained, config, data, sweep_dir, group, starts=starts)
    return {trial: results[trial] for trial in plans}


@dataclasses.dataclass
class Pending:
    """A trial to train: its plan, its config.json, its line in the log and why it trains again."""

    trial: str
    plan: RunPlan
    settings: dict
    step: str = ""
    why: str = ""


# The most heads one pass trains: each costs its weights, Adam moments and best-epoch copies (~40 MB for
# the default fc at 2,048-d), so a larger grid is cut into passes and memory stays flat in its size.
MOST_TOGETHER = 8


def group_trials(pending: list[Pending], *, most: int = MOST_TOGETHER) -> list[list[Pending]]:
    """Trials cut into groups that see the same batches (the same backbones and heads.group.batch_key),
    at most `most` each, in order of their first trial; a trial that must train alone is a group of one."""
    from heads.group import batch_key

    groups: dict = {}
    for i, p in enumerate(pending):
        key = batch_key(p.plan.head, p.plan.train)
        groups.setdefault((p.plan.backbones, key) if key is not None else i, []).append(p)
    return [group[i : i + most] for group in groups.values() for i in range(0, len(group), most)]


def _released(trained, config: Config, data, sweep_dir: Path, group: list[Pending], *, starts) -> dict:
    """trained(...)'s results; its models and graph are released when it ends, so memory stays flat in
    the number of trials."""
    import keras

    for p in group:
        again = f" (trained earlier, but {p.why}: training it again)" if p.why else ""
        print(f"\n{p.step}: {_describe(p.plan)}{again}", flush=True)
    try:
        return trained(config, data, sweep_dir, group, start=starts.for_plan(group[0].plan))
    finally:
        keras.backend.clear_session()
        gc.collect()


def _train_alone(config: Config, data, sweep_dir: Path, group: list[Pending], *, start) -> dict:
    from heads.train import train_head

    (p,) = group
    trial_dir = sweep_dir / p.trial
    plan = dataclasses.replace(p.plan, train=p.plan.train.logged_as(f"{sweep_dir.name}/{p.trial}"))
    metrics = train_head(
        run_dir=trial_dir,
        shared_start=start,
        data=_trial_data(data, plan),
        head=plan.head,
        train=plan.train,
        label_names=config.labels,
        config_snapshot=p.settings,
        force=True,
        eval_split="val",
        decision=config.decision,
        plots=False,  # the winner's are drawn once it is known (plot_finished_run)
    )
    return {p.trial: metrics}


def _train_group(config: Config, data, sweep_dir: Path, group: list[Pending], *, start) -> dict:
    """Trials trained together in one pass over the batches, then each scored and written alone."""
    import time

    from heads.group import Member, fit_together
    from heads.scoring import metadata_baseline
    from heads.train import prepare_training, save_fitted

    print(f"  {len(group)} trials trained together, in one pass over the batches", flush=True)
    trial_data = _trial_data(data, group[0].plan)
    rows, _ = prepare_training(trial_data, train=group[0].plan.train, label_names=config.labels)
    began = time.perf_counter()
    fitted = fit_together(
        trial_data,
        rows=rows,
        members=[Member(p.plan.head, p.plan.train) for p in group],
        n_labels=len(config.labels),
        start=start,
        progress=True,
    )
    seconds = (began, time.perf_counter())
    baseline = metadata_baseline(trial_data, "val")  # fitted once: it does not depend on the head
    results = {}
    for p, head in zip(group, fitted, strict=True):
        results[p.trial] = save_fitted(
            run_dir=sweep_dir / p.trial,
            fitted=head,
            data=trial_data,
            head=p.plan.head,
            train=p.plan.train,
            label_names=config.labels,
            config_snapshot=p.settings,
            seconds=seconds,
            force=True,
            eval_split="val",
            decision=config.decision,
            baseline=baseline,
            plots=False,  # the winner's are drawn once it is known (plot_finished_run)
        )
    return results


def _sort_key(value) -> float:
    return -1.0 if value is None or value != value else float(value)


def _describe(plan: RunPlan) -> str:
    settings = describe_settings(dataclasses.asdict(plan.head), dataclasses.asdict(plan.train))
    return " ".join([f"head={plan.head.kind}", f"backbones={'+'.join(plan.backbones)}", *settings])


def verdict_cell(verdict: dict | None, *, best: bool) -> str:
    """Difference to the best with its interval, and "tied" where the best does not beat it beyond noise."""
    if best:
        return "best"
    if not verdict or verdict.get("difference") is None:
        return MISSING
    text = format_difference(verdict["difference"], verdict["ci"], digits=4)
    return text + (" **tied**" if verdict.get("tied") else "")


def _versus_probe(metrics: dict) -> str:
    """A trial's validation mean AUC minus its ridge probe's, and "kept the probe" where it is the probe."""
    probe = metrics.get("reference")
    if not probe:
        return MISSING
    text = format_difference(probe.get("difference"), probe.get("difference_ci"), digits=4)
    if metrics.get("kept_probe"):
        return text + " **kept the probe**"
    return text + (" **kept its start**" if metrics.get("kept_start") else "")


def format_leaderboard(*, name, ranked, plans, results, test, skipped, verdicts) -> str:
    """Trials ranked by validation mean AUC; the winner's test figure stated once, below the table."""
    from results.report import versus_metadata

    lines = [f"**{SYNTHETIC_NOTICE}**", ""] if test.get("synthetic") else []
    lines += [f"**{seen_notice(test['seen_chestxray14'])}**", ""] if test.get("seen_chestxray14") else []
    lines += [f"# Sweep {name}", ""]
    if all(results[t].get("kept_start") for t in ranked):
        which = "the probe" if all(results[t].get("kept_probe") for t in ranked) else "its start"
        lines += [
            f"**Every trial kept {which}**: no trial's head beat its start (the ridge probe, with its "
            "second-order units where they were chosen) beyond noise on validation. Trials with the same "
            "backbones, metadata and seed share that start: they are one model, and their order below is a tie, not a ranking.",
            "",
        ]
    lines += [
        "Trials are ranked by **validation** mean ROC AUC. Only the winner was evaluated on the test split:",
        "choosing among trials on test would flatter the result. Trials keep validation predictions only.",
        "\"vs winner\" is a trial's validation mean AUC minus the winner's, with a 95% paired patient-bootstrap",
        "interval; **tied**: the interval reaches 0, so the winner does not beat that trial beyond noise.",
        "",
        "| rank | trial | val mean AUC | vs winner (val) [95% CI] | vs ridge probe (val) "
        "| vs metadata baseline (val) | epochs | configuration |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rank, trial in enumerate(ranked, 1):
        m = results[trial]
        verdict = verdict_cell(verdicts.get(trial), best=rank == 1)
        lines.append(
            f"| {rank} | {trial} | {format_auc(m['mean_auc'])} | {verdict} | {_versus_probe(m)} "
            f"| {versus_metadata(m)} | {m.get('epochs', '')} | {_describe(plans[trial])} |"
        )
    lines += [
        "",
        f"Winner: **{ranked[0]}**. Test mean ROC AUC {format_auc(test['mean_auc'], test['mean_ci'])} (95% CI, patient bootstrap), "
        f"{test['images']} test images; metadata baseline on test: {versus_metadata(test)}; per disease, "
        "with its operating points, in winner-test-auc.md.",
    ]
    if skipped:
        # One line per reason: a grid crossing heads with backbone lists skips many alike (full list in sweep.json).
        lines += ["", f"Skipped {len(skipped)} combinations that make no sense:"]
        lines += [f"- {n} × {reason}" for reason, n in Counter(s["reason"] for s in skipped).items()]
    return "\n".join(lines) + "\n"
