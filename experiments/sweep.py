"""Head sweeps: every combination of a TOML grid trained on features loaded once, chosen on validation."""

import dataclasses
import itertools
import json
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
from experiments.experiment import RunPlan, plan_run, sized_for_data, snapshot
from heads.settings import FILE_HEAD, describe_settings, is_file_head
from results.format import format_auc
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
    "metadata": bool,
    "augment": bool,
    "epochs": int,
    "batch_size": int,
    "seed": int,
    "patience": int,
    "options": dict,  # keyword options of a head from your own file, e.g. [{width = 64}, {width = 128}]
}
REQUIRED = ("head", "backbone")


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
    both = sorted(set(axes) & set(fixed))
    if both:
        raise InputError(f"{path}: {both[0]!r} is both a grid axis and in [fixed]; keep one")
    return axes, fixed


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


def _finished(trial_dir: Path) -> dict | None:
    metrics = trial_dir / "metrics.json"
    return read_results(metrics).as_dict() if metrics.is_file() else None


def run_sweep(config: Config, *, grid_path: Path, name: str) -> dict:
    """Train every trial not already finished, rank by validation mean AUC, test only the winner."""
    from experiments.data import open_run_data
    from experiments.provenance import check_caches
    from heads.scoring import score_run
    from results.report import write_auc_table

    axes, fixed = read_grid(grid_path)
    combos = expand_grid(axes, fixed)
    plans, skipped = plan_trials(config, combos, axes=list(axes))
    if not plans:
        reasons = sorted({s["reason"] for s in skipped})
        raise InputError(f"{grid_path}: no valid combination to train; every one was skipped: {reasons}")
    backbones = sorted({b for plan in plans.values() for b in plan.backbones})
    check_caches(config, backbones)
    # One load for every trial: all trials then also see exactly the same rows.
    dataset, data = open_run_data(config, backbones=backbones, metadata=True)
    plans = {trial: sized_for_data(plan, data) for trial, plan in plans.items()}
    sweep_dir = config.runs_dir / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(grid_path, sweep_dir / "grid.toml")
    print(
        f"sweep {name}: {len(plans)} trials ({len(combos)} combinations, {len(skipped)} skipped)", flush=True
    )
    with models_built_in_a_loop():
        results = {
            trial: _run_trial(config, data, sweep_dir / trial, plan, step=f"[{i}/{len(plans)}] {trial}")
            for i, (trial, plan) in enumerate(plans.items(), 1)
        }

    ranked = sorted(results, key=lambda t: _sort_key(results[t]["mean_auc"]), reverse=True)
    winner, winner_plan = ranked[0], plans[ranked[0]]
    test = score_run(
        run_dir=sweep_dir / winner,
        data=_trial_data(data, winner_plan),
        split="test",
        n_boot=winner_plan.train.bootstrap,
        seed=winner_plan.train.seed,
    )
    write_auc_table(
        test, sweep_dir / "winner-test-auc.md", label_names=config.labels, run_name=f"{name}/{winner}"
    )
    board = format_leaderboard(
        name=name, ranked=ranked, plans=plans, results=results, test=test, skipped=skipped
    )
    (sweep_dir / "leaderboard.md").write_text(board, encoding="utf-8")
    summary = _sweep_summary(ranked=ranked, results=results, test=test, skipped=skipped)
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return {**summary, "summary": board + f"\nwritten to {sweep_dir}"}


def _sweep_summary(*, ranked: list[str], results: dict, test: dict, skipped: list) -> dict:
    """sweep.json: the winner, its validation and test figures, every trial's validation mean AUC."""
    notice = {"notice": test["notice"]} if test.get("notice") else {}
    return notice | {
        "winner": ranked[0],
        "val_mean_auc": results[ranked[0]]["mean_auc"],
        "test_mean_auc": test["mean_auc"],
        "test_mean_ci": test["mean_ci"],
        "test_beats_metadata": test["baselines"]["beats_metadata"],
        "trials": {t: results[t]["mean_auc"] for t in ranked},
        "skipped": skipped,
    }


def _run_trial(config: Config, data, trial_dir: Path, plan: RunPlan, *, step: str) -> dict:
    """A trial's validation metrics: trained now, or read back when an earlier run finished it."""
    from heads.train import train_head

    done = _finished(trial_dir)
    if done is not None:
        print(f"{step}: finished earlier, val mean AUC {format_auc(done['mean_auc'])}", flush=True)
        return done
    print(f"\n{step}: {_describe(plan)}", flush=True)
    return train_head(
        run_dir=trial_dir,
        data=_trial_data(data, plan),
        head=plan.head,
        train=plan.train,
        label_names=config.labels,
        config_snapshot=snapshot(config, plan, caches=data.caches, synthetic=data.synthetic),
        force=True,
        eval_split="val",
        decision=config.decision,
    )


def _sort_key(value) -> float:
    return -1.0 if value is None or value != value else float(value)


def _describe(plan: RunPlan) -> str:
    settings = describe_settings(dataclasses.asdict(plan.head), dataclasses.asdict(plan.train))
    return " ".join([f"head={plan.head.kind}", f"backbones={'+'.join(plan.backbones)}", *settings])


def format_leaderboard(*, name, ranked, plans, results, test, skipped) -> str:
    """Trials ranked by validation mean AUC; the winner's test figure stated once, below the table."""
    from results.report import versus_metadata

    lines = [f"**{SYNTHETIC_NOTICE}**", ""] if test.get("synthetic") else []
    lines += [f"**{seen_notice(test['seen_chestxray14'])}**", ""] if test.get("seen_chestxray14") else []
    lines += [
        f"# Sweep {name}",
        "",
        "Trials are ranked by **validation** mean ROC AUC. Only the winner was evaluated on the test split:",
        "choosing among trials on test would flatter the result. Trials keep validation predictions only.",
        "",
        "| rank | trial | val mean AUC | vs metadata baseline (val) | epochs | configuration |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rank, trial in enumerate(ranked, 1):
        m = results[trial]
        lines.append(
            f"| {rank} | {trial} | {format_auc(m['mean_auc'])} | {versus_metadata(m)} | {m.get('epochs', '')} "
            f"| {_describe(plans[trial])} |"
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
