"""One training run from the config and command-line options: data in, run folder out.

Planning a run imports nothing heavy, so the command line refuses a bad plan at once; the data and
TensorFlow load only to train or score.
"""

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from cxr14.errors import Fix, InputError
from experiments.config import Config
from experiments.preflight import backbone_kind
from experiments.provenance import snapshot
from heads.run_folder import read_config, refuse_existing, run_path
from heads.settings import HEAD_KINDS, HeadConfig, TrainConfig, kind_of
from results.summary import summarize_metrics


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything that defines a run: the head, its training, and the backbones it reads."""

    head: HeadConfig
    train: TrainConfig
    backbones: tuple[str, ...]

    def default_name(self) -> str:
        return f"{self.head.kind}-{'+'.join(self.backbones)}"


def plan_run(config: Config, *, kind: str, backbones: str | Sequence[str]) -> RunPlan:
    """The head preset of `kind` and [train] from `config` (flags already applied), over `backbones`
    (each a [backbones] table, or a feature file of one's own in the cache folder)."""
    head = config.head(kind)
    spec = kind_of(head)
    if head.builder:
        from heads.custom import check_builder_file  # light: no TensorFlow

        check_builder_file(head.builder)
    if isinstance(backbones, str):
        backbones = [b.strip() for b in backbones.split(",") if b.strip()]
    backbones = tuple(backbones)
    most = spec.max_backbones or len(backbones)
    if not spec.min_backbones <= len(backbones) <= most:
        others = [k.name for k in HEAD_KINDS.values() if k.max_backbones != 1]
        raise InputError(
            f"the {kind} head takes {spec.min_backbones if most == spec.min_backbones else 'two or more'} "
            f"backbone(s), got {list(backbones)}"
            + (f"; for several, use the {' or '.join(others)} head" if spec.max_backbones == 1 else "")
        )
    for name in backbones:
        holds = backbone_kind(config, name)
        if holds != spec.takes:
            raise InputError(
                f"the {kind} head trains on cached {spec.takes}, but backbone {name!r} holds {holds}; "
                f"heads for {holds}: {', '.join(k.name for k in HEAD_KINDS.values() if k.takes == holds)}"
            )
    return RunPlan(head=head, train=config.train, backbones=backbones)


def sized_for_data(plan: RunPlan, data) -> RunPlan:
    """The plan with what depends on the data's size settled (an "auto" batch size), so that config.json
    records what was trained."""
    return dataclasses.replace(plan, train=plan.train.sized_for(data.rows("train").size))


def run_train_head(
    config: Config,
    *,
    kind: str,
    backbones: str | Sequence[str],
    name: str | None,
    force: bool,
    plan: RunPlan | None = None,
) -> dict:
    """Load the data set and cached features, train the head, write runs/NAME/. `plan`: plan_run's
    answer for the same kind and backbones when the caller has it already."""
    from experiments.data import open_training_data
    from heads.train import train_head

    plan = plan or plan_run(config, kind=kind, backbones=backbones)
    run_dir = run_path(config.runs_dir, name or plan.default_name())
    try:
        refuse_existing(run_dir, force=force)
    except InputError as err:
        raise err.fixed_by(Fix("train-head", {"force": True})) from None
    dataset, data = open_training_data(config, backbones=plan.backbones, metadata=plan.train.metadata)
    # The batch size settled for the data (an "auto" one), the TensorBoard folder the run's own.
    plan = dataclasses.replace(
        plan, train=plan.train.sized_for(data.rows("train").size).logged_as(run_dir.name)
    )
    config_snapshot = snapshot(config, plan, caches=data.caches, synthetic=dataset.synthetic)
    metrics = train_head(
        run_dir=run_dir,
        data=data,
        head=plan.head,
        train=plan.train,
        label_names=config.labels,
        config_snapshot=config_snapshot,
        force=force,
        decision=config.decision,
    )
    return {**metrics, "run_dir": run_dir, "summary": summarize_metrics(metrics, run_dir=run_dir)}


def run_evaluate(config: Config, *, run_dir: Path, split: str, expert: Path | bool | None = None) -> dict:
    """Recompute a run's metrics on `split` from its saved model and the cache; with `expert` (True: find
    the file in the data folder, or a path), score it against Google's expert labels instead."""
    from experiments.data import open_run_data
    from experiments.provenance import check_unchanged
    from heads.scoring import evaluation_path, score_expert, score_run

    saved = read_config(run_dir)
    _, data = open_run_data(config, backbones=list(saved["backbones"]), metadata=saved["train"]["metadata"])
    check_unchanged(run_dir, saved=saved, caches=data.caches, cache_dir=config.cache_dir)
    scoring = {"run_dir": run_dir, "data": data, "split": split}
    scoring |= {"n_boot": saved["train"]["bootstrap"], "seed": saved["train"]["seed"]}
    if expert:
        from results.expert import find_expert_files, format_expert

        files = find_expert_files(config.data_dir) if expert is True else [Path(expert)]
        result = score_expert(**scoring, expert_files=files)
        return {**result, "summary": format_expert(result, split=split)}
    metrics = score_run(**scoring)
    written = evaluation_path(run_dir, split)
    summary = summarize_metrics(metrics, run_dir=run_dir, split=split, written=written)
    return {**metrics, "written": written, "summary": summary}


def run_localization(
    config: Config, *, run_dir: Path, bbox_csv: Path, split: str, method: str = "auto"
) -> dict:
    """The pointing game of a run on the boxed images of `split` under the config's data folder."""
    from dataset.index import find_images
    from experiments.data import open_config_dataset
    from inference.localization import pointing_game, read_boxes
    from inference.trained import load_run

    run = load_run(run_dir)
    boxes = read_boxes(bbox_csv, labels=run.labels)
    dataset = open_config_dataset(config)
    in_split = {
        name for name, inside in zip(dataset.index.names, dataset.splits.mask(split), strict=True) if inside
    }
    chosen = {name: found for name, found in boxes.items() if name in in_split}
    names = sorted(chosen)
    paths = dict(zip(names, find_images(config.data_dir, names), strict=True))
    result = pointing_game(
        run, boxes=chosen, paths=paths, method=method, max_pixels=config.extract.max_pixels
    )
    result |= {"split": split, "images": len(chosen), "outside_split": len(boxes) - len(chosen)}
    return result
