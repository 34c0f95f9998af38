"""The one-command demo: sample data, two offline backbones, the fc and ensemble heads, an AUC table."""

import dataclasses
import time
from pathlib import Path

from cxr14.caveats import SYNTHETIC_NOTICE
from experiments.config import Config

DEMO_BACKBONES = ("offline_cnn", "offline_cnn_wide")
DEMO_IMAGES = 2000


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_demo(config: Config, *, workdir: Path, images: int | None = None) -> str:
    """Run the whole pipeline offline under `workdir`; a second run reuses the sample and the cache."""
    from dataset.sample import make_sample
    from experiments.data import open_config_dataset
    from experiments.experiment import run_train_head
    from experiments.extract import format_extract_summary, run_extract
    from experiments.leaderboard import leaderboard

    start = time.perf_counter()
    workdir = Path(workdir)
    config = dataclasses.replace(
        config, data_dir=workdir / "data", cache_dir=workdir / "features", runs_dir=workdir / "runs"
    )
    if (config.data_dir / "Data_Entry_2017.csv").is_file():
        _step(f"sample data set: reusing {config.data_dir}")
    else:
        _step(f"making a sample data set in {config.data_dir}")
        make_sample(config.data_dir, images=images or DEMO_IMAGES, seed=0, label_names=config.labels)

    _step(f"stage one: extracting {', '.join(DEMO_BACKBONES)} in one pass (finished shards are reused)")
    for summary in run_extract(config, backbones=DEMO_BACKBONES):
        print(format_extract_summary(summary), flush=True)

    runs = []
    for head, backbones in (("fc", DEMO_BACKBONES[0]), ("ensemble", ",".join(DEMO_BACKBONES))):
        _step(f"stage two: training the {head} head on {backbones}")
        # The config's own training settings: the README's train-head commands on this sample give the same.
        metrics = run_train_head(
            config,
            kind=head,
            backbones=backbones,
            name=None,
            force=True,
        )
        print(metrics["summary"], flush=True)
        runs.append(metrics["run_dir"])

    board = config.runs_dir / "leaderboard.md"
    index = open_config_dataset(config).index
    board.write_text(leaderboard(runs, index=index), encoding="utf-8")
    lines = [
        "",
        f"demo finished in {time.perf_counter() - start:.0f} s",
        f"leaderboard: {board}",
        *(
            f"run: {run}  (auc.md, roc.png, auc.png, calibration.png, metrics.json, predictions.csv)"
            for run in runs
        ),
        f"every result above is on a {SYNTHETIC_NOTICE}",
        f"next: python run.py predict --run {runs[-1]} YOUR_XRAY.png (or .dcm) --heatmap heatmaps",
        "      (this shows the command works; it is not a medical model: the demo's backbones have random "
        "weights and it learned drawn chests)",
    ]
    return "\n".join(lines)
