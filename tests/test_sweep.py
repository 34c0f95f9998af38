"""heads.sweep: grids expand and validate, every trial trains once, resume skips finished trials,
the winner is picked on validation and only the winner sees the test split."""

import dataclasses
import json

import pandas as pd
import pytest

import heads.group
import heads.start
import heads.train
from cxr14.errors import InputError
from experiments.sweep import expand_grid, read_grid, run_sweep

REAL_TRAIN_HEAD = heads.train.train_head
REAL_SAVE_FITTED = heads.train.save_fitted

GRID = """
head = ["fc"]
backbone = ["offline_cnn", "offline_cnn_wide"]
units = [[16], [32, 16]]
lr = [0.01, 0.003]
[fixed]
epochs = 2
"""


def _grid(tmp_path, text=GRID):
    path = tmp_path / "grid.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_grid_expands_every_combination(tmp_path):
    axes, fixed = read_grid(_grid(tmp_path))
    combos = expand_grid(axes, fixed)
    assert len(combos) == 8
    assert {c["units"] for c in combos} == {(16,), (32, 16)}
    assert all(c["epochs"] == 2 for c in combos)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("head = ['fc']\nbackbone = ['a']\nwidth = [1]\n", "width"),
        ("head = 'fc'\nbackbone = ['a']\n", "non-empty list"),
        ("head = ['fc']\n", "backbone"),
        ("head = ['fc']\nbackbone = ['a']\nunits = [[1, 'x']]\n", "units"),
        ("head = ['fc']\nbackbone = ['a']\nlr = ['fast']\n", "lr"),
        ("head = ['fc']\nbackbone = ['a']\nlr = [0.1]\n[fixed]\nlr = 0.2\n", "both"),
        ("head = ['mlp']\nbackbone = ['a']\n", r"head value 'mlp' is not allowed \(one of linear, fc"),
        ("head = ['fc']\nbackbone = ['a']\ndropout = [0.2, 1.5]\n", r"dropout value 1.5 .*below 1"),
        ("head = ['fc']\nbackbone = ['a']\nloss = ['hinge']\n", r"loss value 'hinge' .*bce"),
        ("head = ['fc']\nbackbone = ['a']\n[fixed]\nepochs = 0\n", r"epochs value 0 .*range"),
    ],
)
def test_bad_grid_names_the_key(tmp_path, text, needle):
    with pytest.raises(InputError, match=needle):
        read_grid(_grid(tmp_path, text))


def _counting(monkeypatch, *, fail_on=None):
    """Count the trials written, trained alone (train_head) or together (save_fitted after one pass), and
    check none of them evaluates on test; optionally die on trial N."""
    calls = []

    def counted(real, **extra):
        def wrapper(**kwargs):
            calls.append(kwargs["run_dir"].name)
            assert kwargs["eval_split"] == "val"
            if fail_on is not None and len(calls) == fail_on:
                raise KeyboardInterrupt
            return real(**kwargs, **extra)

        return wrapper

    monkeypatch.setattr(heads.train, "train_head", counted(REAL_TRAIN_HEAD, progress=False))
    monkeypatch.setattr(heads.train, "save_fitted", counted(REAL_SAVE_FITTED))
    return calls


def test_sweep_resumes_and_picks_on_validation_only(tmp_path, tiny_project, monkeypatch):
    config = dataclasses.replace(tiny_project, runs_dir=tmp_path / "runs")
    grid = _grid(tmp_path)

    calls = _counting(monkeypatch, fail_on=4)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, grid_path=grid, name="s")
    assert len(calls) == 4

    calls = _counting(monkeypatch)
    fits = []
    real_fit_start = heads.start.fit_start
    monkeypatch.setattr(
        heads.start, "fit_start", lambda data, **kw: fits.append(1) or real_fit_start(data, **kw)
    )
    result = run_sweep(config, grid_path=grid, name="s")
    # Three trials finished before the interruption (in the middle of writing one pass's four); the fourth
    # and the rest train now.
    assert len(calls) == 5
    # The probe and directions are fitted once per backbone set, not once per trial.
    assert len(fits) == 2
    sweep_dir = config.runs_dir / "s"
    trials = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
    assert len(trials) == 8

    val = {t.name: json.loads((t / "metrics.json").read_text())["mean_auc"] for t in trials}
    for t in trials:
        assert json.loads((t / "metrics.json").read_text())["split"] == "val"
    assert val[result["winner"]] == max(val.values())
    # Only the winner was ever evaluated on the test split.
    tested = [p.parent.name for p in sweep_dir.glob("*/evaluate-test.json")]
    assert tested == [result["winner"]]
    # No trial holds a test prediction from which a test AUC could be computed.
    for t in trials:
        assert set(pd.read_csv(t / "predictions.csv")["split"]) == {"val"}, t.name
    winner_test = json.loads((sweep_dir / result["winner"] / "evaluate-test.json").read_text())
    assert (
        winner_test["operating_points"]["chosen_on"] == "val"
        and not winner_test["operating_points"]["in_sample"]
    )
    assert "Threshold" in (sweep_dir / "winner-test-auc.md").read_text()
    # The winner's plots are drawn (on validation, from its files); the other trials' are not.
    plotted = {p.parent.name for p in sweep_dir.glob("*/*.png")}
    assert plotted == {result["winner"]}
    assert sorted(p.name for p in (sweep_dir / result["winner"]).glob("*.png")) == [
        "auc.png",
        "calibration.png",
        "roc.png",
    ]
    board = (sweep_dir / "leaderboard.md").read_text()
    assert "validation" in board and result["winner"] in board
    assert board.startswith("**synthetic sample") and "vs metadata baseline" in board
    assert board.index(result["winner"]) < board.index(min(val, key=val.get))

    _check_verdicts(config, sweep_dir, result, board)

    calls = _counting(monkeypatch)
    again = run_sweep(config, grid_path=grid, name="s")
    assert calls == [] and again["winner"] == result["winner"]


def test_sweep_skips_combinations_that_make_no_sense(tmp_path, tiny_project, monkeypatch):
    config = dataclasses.replace(tiny_project, runs_dir=tmp_path / "runs")
    grid = _grid(
        tmp_path,
        'head = ["fc", "ensemble"]\nbackbone = ["offline_cnn", "offline_cnn,offline_cnn_wide"]\n'
        "[fixed]\nepochs = 1\n",
    )
    calls = _counting(monkeypatch)
    result = run_sweep(config, grid_path=grid, name="mix")
    assert len(calls) == 2
    assert len(result["skipped"]) == 2


def _check_verdicts(config, sweep_dir, result, board):
    """Every trial's difference to the winner agrees with a paired bootstrap done here from the two
    predictions.csv files; ties are marked where the interval reaches 0."""
    from experiments.data import open_config_dataset
    from results.metrics import bootstrap_difference

    summary = json.loads((sweep_dir / "sweep.json").read_text())
    verdicts, winner = summary["versus_winner"], result["winner"]
    assert verdicts[winner]["difference"] == 0.0 and verdicts[winner]["p"] == 1.0
    index = open_config_dataset(config).index

    def scores(trial):
        table = pd.read_csv(sweep_dir / trial / "predictions.csv")
        return table, table[list(config.labels)].to_numpy()

    table, best = scores(winner)
    rows = index.rows(table["name"])
    for trial, verdict in verdicts.items():
        other_table, other = scores(trial)
        assert list(other_table["name"]) == list(table["name"])
        expected = bootstrap_difference(
            index.labels[rows],
            other,
            best,
            groups=index.patients[rows],
            n_boot=config.train.bootstrap,
            seed=0,
        )
        assert verdict["difference"] == pytest.approx(expected["difference"], abs=1e-5)
        assert verdict["ci"] == pytest.approx(expected["ci"], abs=1e-5)
        assert verdict["tied"] == (trial != winner and verdict["ci"][1] >= 0)
    assert "vs winner (val)" in board and "best" in board
    assert summary["tied_with_winner"] == [t for t in verdicts if verdicts[t]["tied"]]
    if summary["tied_with_winner"]:
        assert "**tied**" in board


def test_unknown_backbone_is_refused_before_anything_trains(tmp_path, tiny_project, monkeypatch):
    config = dataclasses.replace(tiny_project, runs_dir=tmp_path / "runs")
    calls = _counting(monkeypatch)
    grid = _grid(tmp_path, 'head = ["fc"]\nbackbone = ["offline_cnn", "nope"]\n')
    with pytest.raises(InputError, match="backbone value 'nope'.*no backbone named 'nope'"):
        run_sweep(config, grid_path=grid, name="bad")
    assert calls == [] and not (config.runs_dir / "bad").exists()


def test_a_sweep_whose_trials_all_kept_the_probe_says_so_at_the_top(tmp_path, tiny_project, monkeypatch):
    config = dataclasses.replace(tiny_project, runs_dir=tmp_path / "runs")
    # A linear head started at the probe is the probe: both trials keep it, whatever their seed.
    grid = _grid(tmp_path, 'head = ["linear"]\nbackbone = ["offline_cnn"]\nseed = [0, 1]\n')
    result = run_sweep(config, grid_path=grid, name="ties")
    board = (config.runs_dir / "ties" / "leaderboard.md").read_text()
    head = board.split("| rank |")[0]
    assert "**Every trial kept the probe**" in head and "tie, not a ranking" in head
    assert board.count("**kept the probe**") == 2
    assert sorted(result["kept_probe"]) == sorted(result["trials"])
    assert "start=probe" in board and "lr=" not in board  # a closed-form probe lists no training settings

    grid = _grid(
        tmp_path,
        'head = ["fc"]\nbackbone = ["offline_cnn"]\nstart = ["probe", "none"]\n[fixed]\nepochs = 2\n',
    )
    result = run_sweep(config, grid_path=grid, name="starts")
    board = (config.runs_dir / "starts" / "leaderboard.md").read_text()
    assert "Every trial kept the probe" not in board
    assert "start=none" in board and "start=probe" in board


def test_trials_trained_together_score_as_they_do_alone(tmp_path, tiny_project, monkeypatch):
    """A grid of lr x dropout trains in one pass; each trial's validation mean AUC is the one it gets when
    trained alone with the same seed (the issue allows 0.003), and its model.keras is a stock head."""
    import keras

    config = dataclasses.replace(tiny_project, runs_dir=tmp_path / "runs")
    grid = _grid(
        tmp_path,
        'head = ["fc"]\nbackbone = ["offline_cnn"]\nlr = [0.01, 0.003]\ndropout = [0.0, 0.3]\n'
        "[fixed]\nepochs = 3\n",
    )
    passes = []
    real_fit_together = heads.group.fit_together
    monkeypatch.setattr(
        heads.group,
        "fit_together",
        lambda data, **kw: passes.append(len(kw["members"])) or real_fit_together(data, **kw),
    )
    calls = _counting(monkeypatch)
    result = run_sweep(config, grid_path=grid, name="together")
    assert passes == [4] and len(calls) == 4
    for trial, (lr, dropout) in {
        "fc-offline_cnn-lr0.01-dropout0": (0.01, 0.0),
        "fc-offline_cnn-lr0.003-dropout0.3": (0.003, 0.3),
    }.items():
        one = _grid(
            tmp_path,
            f'head = ["fc"]\nbackbone = ["offline_cnn"]\n[fixed]\nlr = {lr}\ndropout = {dropout}\nepochs = 3\n',
        )
        alone = run_sweep(config, grid_path=one, name=f"alone-{trial}")
        assert calls[-1] == "fc-offline_cnn" and passes == [4]  # trained by train_head, not in a pass
        (auc,) = alone["trials"].values()
        assert abs(result["trials"][trial] - auc) <= 0.003, trial
    model = keras.saving.load_model(
        config.runs_dir / "together" / "fc-offline_cnn-lr0.01-dropout0" / "model.keras"
    )
    assert {type(layer).__module__.split(".")[0] for layer in model.layers} == {"keras"}


def test_a_sweep_over_a_streamed_cache_is_refused_before_anything_is_fitted(
    tmp_path, tiny_project, monkeypatch
):
    import heads.data

    config = dataclasses.replace(tiny_project, runs_dir=tmp_path / "runs")
    calls = _counting(monkeypatch)
    # Every cache over the budget, so each is streamed from disk as a token cache beyond it would be.
    monkeypatch.setattr(heads.data, "beyond_budget", lambda path, budget_gb: True)

    def no_start(*args, **kwargs):
        raise AssertionError("the probe start was fitted before the sweep was refused")

    monkeypatch.setattr(heads.start, "fit_start", no_start)
    with pytest.raises(InputError, match=r"offline_cnn\.h5.*streamed from disk.*sweep.*train-head"):
        run_sweep(config, grid_path=_grid(tmp_path), name="streamed")
    assert calls == [] and not (config.runs_dir / "streamed").exists()
