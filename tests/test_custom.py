"""heads.custom: a head from the user's own file trains, sweeps, evaluates, predicts, exports, and keeps
working after the file changes; every fault in the file is one line, exit 2."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import run

# A head file outside the repository, with a custom layer of its own.
HEAD_FILE = """
import keras


@keras.saving.register_keras_serializable(package="test_heads")
class Squash(keras.layers.Layer):
    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform")

    def call(self, x):
        return keras.ops.tanh(x @ self.w)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def mix(inputs, *, n_labels, width=8):
    parts = [Squash(width)(t) for t in inputs.values()]
    x = parts[0] if len(parts) == 1 else keras.layers.Add()(parts)
    return keras.layers.Dense(n_labels)(x)


def boom(inputs, *, n_labels):
    raise ValueError("width must be even")


def narrow(inputs, *, n_labels):
    return keras.layers.Dense(3)(next(iter(inputs.values())))
"""
BACKBONES = "offline_cnn,offline_cnn_wide"


@pytest.fixture
def head_file(tmp_path):
    path = tmp_path / "outside" / "my_heads.py"
    path.parent.mkdir()
    path.write_text(HEAD_FILE, encoding="utf-8")
    return path


def _common(project, tmp_path):
    return ["--config", str(project.path), "--runs-dir", str(tmp_path / "runs")]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_file_head_trains_sweeps_and_its_run_outlives_the_file(tmp_path, tiny_project, head_file, capsys):
    common = _common(tiny_project, tmp_path)
    head = f"{head_file}:mix"
    train = ["train-head", *common, "--head", head, "--backbone", BACKBONES, "--epochs", "2", "--name", "m"]
    assert run.main([*train, "--head-option", "width=4"]) == 0
    run_dir = tmp_path / "runs" / "m"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["head"]["builder"] == head and saved["head"]["options"] == {"width": 4}
    assert (run_dir / "head_code.py").read_text() == HEAD_FILE
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The probe's start and reference, as for a built-in feature head.
    assert metrics["reference"]["name"] == "ridge probe" and metrics["head"] == "mix"
    capsys.readouterr()

    # A sweep: the file head beside fc; both trials train and are ranked.
    grid = tmp_path / "grid.toml"
    grid.write_text(f'head = ["fc", "{head_file}:mix"]\nbackbone = ["offline_cnn"]\n[fixed]\nepochs = 1\n')
    assert run.main(["sweep", *common, "--grid", str(grid), "--name", "s"]) == 0
    trials = json.loads((tmp_path / "runs" / "s" / "sweep.json").read_text())["trials"]
    assert set(trials) == {"fc-offline_cnn", "mix-offline_cnn"}
    capsys.readouterr()

    # The file is broken, then deleted: the run loads its own copy.
    head_file.write_text("raise RuntimeError('edited')\n")
    assert run.main(["evaluate", *common, "--run", "m"]) == 2
    assert "--trust-head-code" in _one_error_line(capsys)
    assert run.main(["evaluate", *common, "--run", "m", "--head-code", str(head_file)]) == 2
    assert "not the head code" in _one_error_line(capsys)
    head_file.unlink()
    assert run.main(["evaluate", *common, "--run", "m", "--trust-head-code", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_auc"] == pytest.approx(metrics["mean_auc"], abs=1e-6)
    # The sweep resumed: the finished trials are read back and the winner scored from its copy.
    assert run.main(["sweep", *common, "--grid", str(grid), "--name", "s"]) == 0
    assert "finished earlier" in capsys.readouterr().out

    images = sorted((tiny_project.data_dir / "images").glob("*.png"))[:3]
    trusted = ["--run", str(run_dir), "--trust-head-code"]
    heatmaps = tmp_path / "heatmaps"
    predict = ["predict", *common, *trusted, *map(str, images), "--json", "--heatmap", str(heatmaps)]
    assert run.main(predict) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert len(list(heatmaps.glob("*.png"))) == len(images)
    out = tmp_path / "export"
    assert run.main(["export", *common, *trusted, "--out", str(out)]) == 0
    _check_export_matches(out, images=images, predicted=predicted, labels=saved["labels"])


def _check_export_matches(out: Path, *, images, predicted, labels) -> None:
    import tensorflow as tf

    model = tf.saved_model.load(str(out))
    pngs = tf.constant([p.read_bytes() for p in images])
    got = model.predict_png(pngs)["probabilities"].numpy()
    results = predicted if isinstance(predicted, list) else predicted["results"]
    expected = np.array([[r["probabilities"][label] for label in labels] for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("head", "options", "says"),
    [
        ("missing.py:mix", [], r"missing\.py:mix: no file"),
        (
            "{file}:absent",
            [],
            r"my_heads\.py has no function 'absent' \(functions there: mix, boom, narrow\)",
        ),
        ("{file}:boom", [], r"boom: raised while building the head: ValueError: width must be even"),
        ("{file}:narrow", [], r"narrow: returned logits of shape \(batch, 3\); expected \(batch, 14\)"),
        (
            "{file}:mix",
            ["--head-option", "depth=2"],
            r"mix: does not accept option 'depth' \(its options: width\)",
        ),
    ],
)
def test_bad_head_code_is_one_line_naming_file_and_function(
    tmp_path, tiny_project, head_file, capsys, head, options, says
):
    head = head.format(file=head_file)
    args = ["train-head", *_common(tiny_project, tmp_path), "--head", head, "--backbone", BACKBONES]
    assert run.main([*args, "--epochs", "1", *options]) == 2
    line = _one_error_line(capsys)
    assert re.search(says, line), line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("*/metrics.json"))


def test_a_config_table_names_a_builder_and_its_options(tmp_path, tiny_project, head_file, capsys):
    project = tmp_path / "project"
    shutil.copytree(tiny_project.path.parent, project, ignore=shutil.ignore_patterns("runs"))
    shutil.copy(head_file, project / "my_heads.py")
    with (project / "cxr14.toml").open("a") as toml:
        toml.write('[heads.squash]\nbuilder = "my_heads.py:mix"\nwidth = 2\n')
    args = [
        "train-head",
        "--config",
        str(project / "cxr14.toml"),
        "--head",
        "squash",
        "--backbone",
        "offline_cnn",
    ]
    assert run.main([*args, "--epochs", "1", "--name", "t"]) == 0
    saved = json.loads((project / "runs" / "t" / "config.json").read_text())
    assert saved["head"]["options"] == {"width": 2} and saved["head_code"]["function"] == "mix"
    capsys.readouterr()
    # An option for a built-in head is refused, naming the flags it takes instead.
    assert (
        run.main([*args[:-4], "--head", "fc", "--backbone", "offline_cnn", "--head-option", "width=2"]) == 2
    )
    assert "for a head from your own file" in _one_error_line(capsys)


def test_the_readme_notebook_example_runs_as_written_after_the_demo(tmp_path, monkeypatch):
    from experiments.config import load_config
    from experiments.demo import run_demo
    from tests.fixtures import write_tiny_config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- python-api-example -->", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    run_demo(load_config(write_tiny_config(tmp_path)), workdir=tmp_path / "demo", images=160)
    (tmp_path / "examples").mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "examples" / "gated_heads.py", tmp_path / "examples")
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    assert (tmp_path / "demo" / "runs" / "gated-notebook" / "head_code.py").is_file()
