"""heads.demo: the whole pipeline offline, and a second run reuses the sample and the cache."""

import json

from cxr14.config import load_config
from heads.demo import DEMO_BACKBONES, run_demo
from tests.conftest import write_tiny_config


def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path, capsys):
    config = load_config(write_tiny_config(tmp_path))
    workdir = tmp_path / "demo"
    text = run_demo(config, workdir=workdir, images=160)
    runs = workdir / "runs"
    for run in ("fc-offline_cnn", "ensemble-" + "+".join(DEMO_BACKBONES)):
        for output in (
            "config.json",
            "model.keras",
            "history.csv",
            "metrics.json",
            "predictions.csv",
            "auc.md",
            "roc.png",
            "auc.png",
        ):
            assert (runs / run / output).is_file(), f"{run}/{output}"
        metrics = json.loads((runs / run / "metrics.json").read_text())
        assert metrics["split"] == "test"
        # Three deliberately broken sample images are left out and counted.
        assert metrics["excluded"]["failed_extraction"] == 3
    assert "leaderboard" in text and (runs / "leaderboard.md").is_file()
    first = capsys.readouterr().out
    assert "making a sample data set" in first

    sample_csv = (workdir / "data" / "Data_Entry_2017.csv").stat().st_mtime_ns
    features = {b: (workdir / "features" / f"{b}.h5").stat().st_mtime_ns for b in DEMO_BACKBONES}
    run_demo(config, workdir=workdir, images=160)
    second = capsys.readouterr().out
    assert "reusing" in second
    assert (workdir / "data" / "Data_Entry_2017.csv").stat().st_mtime_ns == sample_csv
    assert {b: (workdir / "features" / f"{b}.h5").stat().st_mtime_ns for b in DEMO_BACKBONES} == features
