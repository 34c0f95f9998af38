"""heads.demo: the whole pipeline offline, and a second run reuses the sample and the cache."""

import json

from PIL import Image

from cxr14.caveats import SYNTHETIC_NOTICE
from experiments.config import load_config
from experiments.demo import DEMO_BACKBONES, run_demo
from heads.run_folder import OUTPUTS
from tests.fixtures import write_tiny_config


def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path, capsys):
    config = load_config(write_tiny_config(tmp_path))
    workdir = tmp_path / "demo"
    text = run_demo(config, workdir=workdir, images=160)
    runs = workdir / "runs"
    for run in ("fc-offline_cnn", "ensemble-" + "+".join(DEMO_BACKBONES)):
        for output in OUTPUTS:
            assert (runs / run / output).is_file(), f"{run}/{output}"
        metrics = json.loads((runs / run / "metrics.json").read_text())
        assert metrics["split"] == "test"
        # Three deliberately broken sample images are left out and counted.
        assert metrics["excluded"]["failed_extraction"] == 3
        # Every result the run writes says it is on a synthetic sample, and none reads "official".
        assert metrics["notice"] == SYNTHETIC_NOTICE and "official" not in metrics["split_source"].split()
        for output in ("config.json", "calibration.json", "thresholds.json"):
            assert SYNTHETIC_NOTICE in (runs / run / output).read_text(encoding="utf-8"), output
        assert SYNTHETIC_NOTICE in (runs / run / "auc.md").read_text(encoding="utf-8").splitlines()[0]
        for plot in ("auc.png", "roc.png", "calibration.png"):
            assert SYNTHETIC_NOTICE in Image.open(runs / run / plot).text["Title"], plot
    assert "leaderboard" in text and (runs / "leaderboard.md").is_file()
    assert SYNTHETIC_NOTICE in (runs / "leaderboard.md").read_text(encoding="utf-8").splitlines()[0]
    assert "not a medical model" in text
    first = capsys.readouterr().out
    assert "making a sample data set" in first

    sample_csv = (workdir / "data" / "Data_Entry_2017.csv").stat().st_mtime_ns
    features = {b: (workdir / "features" / f"{b}.h5").stat().st_mtime_ns for b in DEMO_BACKBONES}
    run_demo(config, workdir=workdir, images=160)
    second = capsys.readouterr().out
    assert "reusing" in second
    assert (workdir / "data" / "Data_Entry_2017.csv").stat().st_mtime_ns == sample_csv
    assert {b: (workdir / "features" / f"{b}.h5").stat().st_mtime_ns for b in DEMO_BACKBONES} == features
