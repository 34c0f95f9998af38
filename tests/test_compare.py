"""results.compare and run.py compare: runs against the first named on the same images, from their
predictions.csv; Holm's adjustment."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import run
from cxr14.errors import InputError
from experiments.compare import run_compare
from experiments.data import open_config_dataset
from results.metrics import holm


def test_holm_adjusts_step_down_and_keeps_order():
    adjusted = holm([0.01, 0.04, 0.03, 0.005, np.nan])
    np.testing.assert_allclose(adjusted[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adjusted[4])
    assert holm([0.9, 0.8]).max() == 1.0


def _fake_run(root, name, *, index, rows, scores, config):
    """A run folder holding what compare reads: config.json and predictions.csv."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}", encoding="utf-8")
    table = pd.DataFrame(scores, columns=list(config.labels))
    table.insert(0, "split", "test")
    table.insert(0, "name", index.names[rows])
    table.to_csv(folder / "predictions.csv", index=False)
    return folder


@pytest.fixture
def runs(tmp_path, tiny_project):
    index = open_config_dataset(tiny_project).index
    rng = np.random.default_rng(0)
    rows = np.arange(len(index))
    labels = index.labels[rows].astype(float)
    made = {
        "good": labels * 2.0 + rng.normal(size=labels.shape),
        "bad": rng.normal(size=labels.shape),
        "fewer": rng.normal(size=labels.shape)[:-3],
    }
    folders = {
        name: _fake_run(
            tmp_path / "runs", name, index=index, rows=rows[: len(s)], scores=s, config=tiny_project
        )
        for name, s in made.items()
    }
    return tiny_project, index, folders


def _compare(config, folders, names, *, out, n_boot, seed=0, split="test"):
    """run_compare on the fixture's runs `names`, in that order."""
    return run_compare(
        config, run_dirs=[folders[n] for n in names], split=split, out=out, n_boot=n_boot, seed=seed
    )


def test_a_run_against_itself_differs_by_zero_with_p_one(runs, tmp_path):
    config, _, folders = runs
    with pytest.raises(InputError, match="named twice"):
        _compare(config, folders, ["good", "good"], out=tmp_path / "c", n_boot=50)
    copy = tmp_path / "runs" / "copy"
    copy.mkdir()
    for name in ("config.json", "predictions.csv"):
        (copy / name).write_bytes((folders["good"] / name).read_bytes())
    result = run_compare(
        config, run_dirs=[folders["good"], copy], split="test", out=tmp_path / "c", n_boot=50, seed=0
    )
    versus = result["versus"]["copy"]
    defined = [e for e in versus["labels"].values() if e["difference"] is not None]
    assert defined and all(e["difference"] == 0 and e["p"] == 1 and e["p_holm"] == 1 for e in defined)
    assert versus["mean"]["difference"] == 0 and versus["mean"]["p"] == 1 and versus["mean"]["ci"] == [0, 0]
    assert (tmp_path / "c" / "compare.png").stat().st_size > 0


def _weighted_bootstrap(y, a, b, patients, *, n_boot, seed):
    """The paired patient bootstrap written plainly: each resample weights images by their patient's
    draw count, and scikit-learn scores both runs under those weights."""
    ids, patient = np.unique(patients, return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = np.stack(
        [np.bincount(d, minlength=ids.size) for d in rng.integers(0, ids.size, (n_boot, ids.size))]
    )
    out = np.full((n_boot, y.shape[1]), np.nan)
    for r in range(n_boot):
        w = counts[r][patient]
        for j in range(y.shape[1]):
            kept = w > 0
            if len(set(y[kept, j])) == 2:
                out[r, j] = roc_auc_score(y[:, j], a[:, j], sample_weight=w) - roc_auc_score(
                    y[:, j], b[:, j], sample_weight=w
                )
    return out


def test_a_wide_margin_excludes_zero_and_intervals_match_a_plain_bootstrap(runs, tmp_path):
    config, index, folders = runs
    result = _compare(config, folders, ["bad", "good"], out=tmp_path / "c", n_boot=60, seed=3)
    versus = result["versus"]["good"]
    assert versus["mean"]["ci"][0] > 0 and versus["mean"]["p"] < 0.05
    tables = {n: pd.read_csv(folders[n] / "predictions.csv") for n in ("bad", "good")}
    rows = index.rows(tables["good"]["name"].to_numpy())
    y = index.labels[rows]
    a, b = (tables[n][list(config.labels)].to_numpy() for n in ("good", "bad"))
    plain = _weighted_bootstrap(y, a, b, index.patients[rows], n_boot=60, seed=3)
    for j, label in enumerate(config.labels):
        entry = versus["labels"][label]
        if entry["difference"] is None:
            continue
        finite = plain[:, j][~np.isnan(plain[:, j])]
        assert entry["ci"] == pytest.approx(list(np.quantile(finite, [0.025, 0.975])), abs=1e-9), label


def test_other_images_are_refused_naming_the_difference(runs, tmp_path):
    config, _, folders = runs
    with pytest.raises(
        InputError, match=r"not scored on the same test images: 3 only in good, 0 only in fewer"
    ):
        _compare(config, folders, ["good", "fewer"], out=tmp_path, n_boot=10)
    with pytest.raises(InputError, match="no val predictions"):
        _compare(config, folders, ["good", "bad"], split="val", out=tmp_path, n_boot=10)


def test_compare_command_prints_json(runs, tmp_path, capsys):
    config, _, folders = runs
    common = ["--config", str(config.path), "--runs-dir", str(tmp_path / "runs")]
    assert run.main(["compare", *common, "bad", "good", "--bootstrap", "20", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["against"] == "bad" and set(printed["versus"]) == {"good"}
    assert (tmp_path / "runs" / "compare-bad-vs-good" / "compare.md").is_file()


def test_report_marks_the_best_ties_and_sweeps(runs, tmp_path):
    from experiments.leaderboard import find_reported, leaderboard
    from results.metrics import label_metrics

    config, index, folders = runs
    for name in ("good", "bad"):
        table = pd.read_csv(folders[name] / "predictions.csv")
        rows = index.rows(table["name"].to_numpy())
        metrics = label_metrics(
            index.labels[rows],
            table[list(config.labels)].to_numpy(),
            groups=index.patients[rows],
            label_names=config.labels,
            n_boot=20,
            seed=0,
        )
        (folders[name] / "metrics.json").write_text(json.dumps({**metrics, "split": "test"}))
        (folders[name] / "config.json").write_text(json.dumps({"train": {"bootstrap": 40, "seed": 0}}))
    # A sweep whose winner is a copy of "good", scored on test after the sweep; and one not finished.
    sweep = tmp_path / "runs" / "sw"
    winner = sweep / "trial"
    winner.mkdir(parents=True)
    (sweep / "grid.toml").write_text("")
    (sweep / "sweep.json").write_text(json.dumps({"winner": "trial"}))
    (winner / "config.json").write_bytes((folders["good"] / "config.json").read_bytes())
    scored_on_val = json.loads((folders["good"] / "metrics.json").read_text())
    (winner / "metrics.json").write_text(json.dumps({**scored_on_val, "split": "val"}))
    (winner / "evaluate-test.json").write_bytes((folders["good"] / "metrics.json").read_bytes())
    (winner / "predictions-test.csv").write_bytes((folders["good"] / "predictions.csv").read_bytes())
    (tmp_path / "runs" / "unfinished").mkdir()
    (tmp_path / "runs" / "unfinished" / "grid.toml").write_text("")
    reported = [d for d in find_reported(tmp_path / "runs") if d.name != "fewer"]
    text = leaderboard(reported, index=index)
    rows = {
        cells[1]: cells
        for line in text.splitlines()
        if line.startswith("| ") and line[2].isdigit()
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert "Ranked by **test** mean ROC AUC" in text
    assert set(rows) == {"good", "bad", "sw/trial (sweep winner)"}
    tied = next(c for name, c in rows.items() if name != "bad" and c[3] != "best")
    assert tied[3].startswith("+0.0000") and tied[3].endswith("**tied**")
    assert rows["bad"][0] == "3" and rows["bad"][3].startswith("-") and "tied" not in rows["bad"][3]
    assert "unfinished: a sweep that has not finished" in text


def test_a_comparison_carries_the_runs_caveats(runs, tmp_path):
    from cxr14.caveats import SEEN_NOTICE
    from results.record import write_results

    config, _, folders = runs
    notice = f"{SEEN_NOTICE} (rad_dino)"
    metrics = {"images": 1, "mean_auc": 0.5, "mean_ci": [None, None], "labels": {}, "notice": notice}
    write_results(folders["bad"] / "metrics.json", metrics)
    result = _compare(config, folders, ["good", "bad"], out=tmp_path / "n", n_boot=20)
    assert result["notices"] == [notice]
    assert (tmp_path / "n" / "compare.md").read_text().splitlines()[0] == f"**{notice}**"
