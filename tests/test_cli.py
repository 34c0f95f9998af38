"""run.py: bad input exits with status 2 and a message naming the file, never a traceback; the
subcommands dispatch to the library and print what they promise."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import run
from cxr14 import __version__
from cxr14.errors import Fix, InputError
from heads.run_folder import find_run
from heads.settings import HEAD_KINDS
from tests.fixtures import write_tiny_config

ROOT = Path(__file__).resolve().parents[1]
HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
)


def _csv_only(tmp_path: Path, rows: list[str]) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "Data_Entry_2017.csv").write_text(HEADER + "".join(rows), encoding="utf-8")
    return data


def _row(name: str, labels: str, patient: int, age: str = "58") -> str:
    return f"{name},{labels},0,{patient},{age},M,PA,2682,2749,0.143,0.143,\n"


def test_index_json_on_a_csv_alone(tmp_path, capsys):
    rows = [
        _row(f"{p:08d}_000.png", "Cardiomegaly|Effusion" if p % 2 else "No Finding", p) for p in range(1, 41)
    ]
    rows.append(_row("00000099_000.png", "Hernia", 99, age="412"))
    data = _csv_only(tmp_path, rows)
    assert run.main(["index", "--data-dir", str(data), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 41 and summary["patients"] == 41
    assert summary["no_finding"] == 20
    assert summary["labels"]["Cardiomegaly"] == 20 and summary["labels"]["Hernia"] == 1
    assert summary["ages_invalid"] == 1
    assert summary["split_source"] == "patient-random"
    assert summary["patient_overlap"] == 0
    assert sum(s["images"] for s in summary["splits"].values()) == 41


def test_bad_csv_exits_2_naming_file_and_line(tmp_path):
    data = _csv_only(
        tmp_path, [_row("00000001_000.png", "No Finding", 1), _row("00000002_000.png", "Flu", 2)]
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "index", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Data_Entry_2017.csv" in result.stderr and "line 3" in result.stderr and "Flu" in result.stderr


def test_missing_config_and_unknown_backbone_exit_2(tmp_path, capsys):
    assert run.main(["index", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err
    config = write_tiny_config(tmp_path)
    assert run.main(["extract", "--config", str(config), "--backbone", "resnet152"]) == 2
    assert "offline_cnn" in capsys.readouterr().err


def test_train_head_without_cache_prints_the_extract_command(tmp_path, tiny_project, capsys):
    code = run.main(
        [
            "train-head",
            "--config",
            str(tiny_project.path),
            "--cache-dir",
            str(tmp_path / "empty"),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--head",
            "fc",
            "--backbone",
            "offline_cnn",
        ]
    )
    assert code == 2
    # Complete for the folders and config the user passed (extract takes no --runs-dir).
    expected = (
        f"python run.py extract --backbone offline_cnn --config {tiny_project.path} "
        f"--cache-dir {tmp_path / 'empty'}"
    )
    assert capsys.readouterr().err.rstrip().endswith(expected)


def test_an_existing_run_folder_is_refused_with_the_users_command_and_force(tmp_path, tiny_project, capsys):
    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "metrics.json").write_text("{}", encoding="utf-8")
    argv = ["train-head", "--config", str(tiny_project.path), "--runs-dir", str(runs)]
    argv += ["--head", "fc", "--backbone", "offline_cnn", "--name", "mine"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.rstrip()
    assert f"{runs / 'mine'} exists" in err
    assert err.endswith(": python run.py " + " ".join(argv) + " --force")
    assert (runs / "mine" / "metrics.json").read_text(encoding="utf-8") == "{}"  # nothing touched


def _args(argv: list[str]):
    args = run.build_parser().parse_args(argv)
    args.argv = argv
    return args


def test_suggested_commands_keep_the_users_folders_and_flags():
    args = _args(
        ["train-head", "--head", "fc", "--backbone", "b", "--data-dir", "my data", "--runs-dir", "r"]
    )
    fix = Fix("extract", {"backbone": "b"})
    assert run.suggested_command(fix, args) == "python run.py extract --backbone b --data-dir 'my data'"
    # The same subcommand: the user's own line, plus what the fix adds.
    args = _args(["extract", "--backbone", "b", "--views", "4", "--cache-dir", "c"])
    fix = Fix("extract", {"backbone": "b", "force": True})
    assert run.suggested_command(fix, args) == (
        "python run.py extract --backbone b --views 4 --cache-dir c --force"
    )
    # ... but not where the user's line does more than the fix: only the backbone that needs it is forced.
    args = _args(["extract", "--backbone", "a,b", "--cache-dir", "c"])
    fix = Fix("extract", {"backbone": "b", "force": True})
    assert run.suggested_command(fix, args) == "python run.py extract --backbone b --force --cache-dir c"
    args = _args(["index", "--data-dir", "d", "--config", "other.toml"])
    fix = Fix("make-sample", {"out": "d"})
    assert run.suggested_command(fix, args) == "python run.py make-sample --out d --config other.toml"


def test_help_and_argument_errors_load_nothing_heavy(tiny_project):
    """--help, a mistyped value, a setting out of range and a missing folder, cache or run answer before
    numpy or TensorFlow load."""
    config = str(tiny_project.path)
    argvs = [
        ["--help"],
        ["train-head", "--help"],
        ["bench", "heads", "--help"],
        ["train-head", "--head", "mlp", "--backbone", "x"],
        ["train-head", "--config", config, "--head", "fc", "--backbone", "offline_cnn", "--dropout", "1.5"],
        ["train-head", "--config", config, "--head", "ensemble", "--backbone", "offline_cnn"],
        ["evaluate", "--config", config, "--run", "no-such-run"],
        # What needs no TensorFlow is checked before it loads: the data folder, caches, shards, runs.
        ["index", "--config", config, "--data-dir", "/no/data"],
        ["extract", "--config", config, "--backbone", "offline_cnn", "--data-dir", "/no/data"],
        [
            "extract",
            "--config",
            config,
            "--backbone",
            "offline_cnn",
            "--from-pixels",
            "pixels",
            "--cache-dir",
            "/no/c",
        ],
        ["bench", "extract", "--config", config, "--data-dir", "/no/data"],
        ["merge", "--config", config, "--backbone", "offline_cnn", "--cache-dir", "/no/c"],
        [
            "train-head",
            "--config",
            config,
            "--head",
            "fc",
            "--backbone",
            "offline_cnn",
            "--cache-dir",
            "/no/c",
        ],
        ["train-head", "--config", config, "--head", "fc", "--backbone", "nope"],
        ["report", "--config", config, "--runs-dir", "/no/runs"],
        ["report", "--config", config, "no-such-run"],
        ["predict", "--config", config, "--run", "no-such-run", "x.png"],
        ["export", "--config", config, "--run", "no-such-run", "--out", "x"],
        ["sweep", "--config", config, "--grid", "/no/grid.toml"],
        ["demo", "--config", "/no/config.toml"],
    ]
    code = (
        "import contextlib, io, sys, run\n"
        f"for argv in {argvs!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            assert run.main(argv) == 2, argv\n"
        "        except SystemExit as end:\n"
        "            assert end.code in (0, 2), (argv, end.code)\n"
        "print(sorted(m for m in ('numpy', 'pandas', 'h5py', 'tensorflow', 'keras') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_version_and_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        run.main(["--version"])
    assert capsys.readouterr().out.strip() == f"cxr14 {__version__}"
    parser = run.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        parsers = [sub] if name != "bench" else list(sub._subparsers._group_actions[0].choices.values())
        for p in parsers:
            for action in p._actions:
                assert action.help, (name, action.dest)


def test_make_sample_text_and_json(tmp_path, capsys):
    out = tmp_path / "sample"
    assert run.main(["make-sample", "--out", str(out), "--images", "12", "--size", "32"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"wrote a sample data set to {out}: 12 images of ")
    assert "file formats:" in text and "{" not in text
    assert text.rstrip().endswith(f"next: python run.py index --data-dir {out}")
    assert run.main(["make-sample", "--out", str(out), "--images", "12", "--size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 12


def test_a_run_is_found_by_name_or_path_and_a_missing_one_is_named(tmp_path):
    runs = tmp_path / "runs"
    (runs / "fc-a").mkdir(parents=True)
    (runs / "fc-a" / "config.json").write_text("{}")
    assert find_run("fc-a", runs_dir=runs) == runs / "fc-a"
    assert find_run(str(runs / "fc-a"), runs_dir=tmp_path / "elsewhere") == runs / "fc-a"
    with pytest.raises(InputError, match=r"no run folder 'fc-b'.*runs under .*: fc-a"):
        find_run("fc-b", runs_dir=runs)


def test_a_shard_that_is_not_k_of_n_is_a_usage_error():
    with pytest.raises(SystemExit) as err:
        run.build_parser().parse_args(["extract", "--backbone", "b", "--shard", "x"])
    assert err.value.code == 2


@pytest.mark.parametrize("shard", ["2/2", "1/0"])
def test_a_shard_out_of_range_is_refused(shard, tiny_project, capsys):
    args = ["extract", "--config", str(tiny_project.path), "--backbone", "offline_cnn", "--shard", shard]
    assert run.main(args) == 2
    assert f"shard {shard}" in capsys.readouterr().err


def test_train_evaluate_report_round_trip(tmp_path, tiny_project, capsys):
    common = ["--config", str(tiny_project.path), "--runs-dir", str(tmp_path / "runs")]
    args = ["train-head", *common, "--head", "ensemble", "--backbone", "offline_cnn,offline_cnn_wide"]
    decision = ["--calibration", "isotonic", "--operating-point", "sensitivity", "--target", "0.8"]
    board = tmp_path / "board"
    argv = [
        *args,
        "--epochs",
        "2",
        "--fusion",
        "concat",
        "--name",
        "e",
        *decision,
        "--tensorboard",
        str(board),
    ]
    assert run.main(argv) == 0
    assert list((board / "e").rglob("events.out.tfevents.*"))  # the run's own TensorBoard folder
    # One closing line for the training, no Keras epoch lines.
    out = capsys.readouterr().out
    assert "trained 2 epochs in " in out and "Epoch 1/2" not in out
    trained = json.loads((tmp_path / "runs" / "e" / "metrics.json").read_text())
    saved = json.loads((tmp_path / "runs" / "e" / "config.json").read_text())
    assert saved["head"]["fusion"] == "concat" and saved["train"]["epochs"] == 2
    assert saved["decision"]["calibration"] == "isotonic" and saved["data"]["synthetic"] is True
    made = saved["made_by"]  # what made the run: versions, the code's commit, the command line
    assert made["versions"]["numpy"] == np.__version__ and made["command"] == sys.argv
    assert set(made["git"]) == {"commit", "dirty"} and saved["train"]["tensorboard"] == str(board / "e")
    thresholds = json.loads((tmp_path / "runs" / "e" / "thresholds.json").read_text())
    assert thresholds["method"] == "sensitivity" and thresholds["target"] == 0.8
    assert json.loads((tmp_path / "runs" / "e" / "calibration.json").read_text())["method"] == "isotonic"
    assert saved["feature_dtypes"] == {"offline_cnn": "float16", "offline_cnn_wide": "float16"}
    # A second run with the same name is refused without --force.
    assert run.main([*args, "--name", "e"]) == 2
    capsys.readouterr()
    # --run takes a path or a name under the runs folder; evaluate names the file it wrote.
    assert run.main(["evaluate", *common, "--run", str(tmp_path / "runs" / "e")]) == 0
    written = tmp_path / "runs" / "e" / "evaluate-test.json"
    assert capsys.readouterr().out.rstrip().endswith(f"wrote {written}")
    evaluated = json.loads(written.read_text())
    assert evaluated["mean_auc"] == pytest.approx(trained["mean_auc"], abs=1e-6)
    # The stored operating points and calibration give the same test figures when evaluated again.
    assert evaluated["operating_points"] == trained["operating_points"]
    assert evaluated["calibration"]["ece_after"] == pytest.approx(trained["calibration"]["ece_after"])
    assert evaluated["baselines"] == trained["baselines"]
    assert run.main(["evaluate", *common, "--run", "e", "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "val"
    assert run.main(["report", *common]) == 0
    assert "| e |" in capsys.readouterr().out.replace("|  e |", "| e |")


@pytest.mark.parametrize(
    "args",
    [
        ["train-head", "--head", "fc", "--backbone", "offline_cnn", "--epochs", "0"],
        ["train-head", "--head", "fc", "--backbone", "offline_cnn", "--epochs", "-1"],
        ["train-head", "--head", "fc", "--backbone", "offline_cnn", "--batch-size", "0"],
        ["train-head", "--head", "fc", "--backbone", "offline_cnn", "--lr", "-0.001"],
        ["train-head", "--head", "fc", "--backbone", "offline_cnn", "--units", "64,-1"],
        ["train-head", "--head", "fc", "--backbone", "offline_cnn", "--seed", "-1"],
        ["train-head", "--head", "fc", "--backbone", "offline_cnn", "--dropout", "1.5"],
        ["extract", "--backbone", "offline_cnn", "--views", "0"],
        ["extract", "--backbone", "offline_cnn", "--batch-size", "0"],
        ["make-sample", "--out", "x", "--seed", "-1"],
    ],
)
def test_numbers_out_of_range_on_the_command_line_exit_2(tmp_path, args, capsys):
    """Never a traceback, and never silently replaced by the config's value (`x or settings.x`)."""
    config = write_tiny_config(tmp_path)
    try:
        code = run.main([*args, "--config", str(config)])
    except SystemExit as exit:  # argparse's own refusal
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(("error: ", "run.py ")), err


def test_a_full_disk_outside_the_store_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "x.png"))

    monkeypatch.setattr("dataset.sample.make_sample", full)
    assert run.main(["make-sample", "--out", str(tmp_path / "out"), "--images", "5"]) == 2
    assert capsys.readouterr().err == f"error: no space left on device: {tmp_path / 'out' / 'x.png'}\n"


PIXELS64 = """
[backbones.pixels64]
source = "pixels"
image_size = 64
preprocess = "bytes"
"""


def test_one_pass_then_a_pixel_cache_as_input(tmp_path, tiny_project, capsys):
    from cache import store
    from dataset.index import find_images

    config = write_tiny_config(tmp_path, PIXELS64)
    features = tmp_path / "features"
    common = ["--config", str(config), "--data-dir", str(tiny_project.data_dir), "--cache-dir", str(features)]
    assert run.main(["extract", *common, "--backbone", "offline_cnn,pixels64"]) == 0
    out = capsys.readouterr().out
    assert (
        "offline_cnn: 197 images with features, 3 failed" in out
        and "pixels64: 197 images with features, 3 failed" in out
    )
    args = [
        "extract",
        *common,
        "--backbone",
        "offline_cnn_wide",
        "--from-pixels",
        "pixels64",
        "--limit",
        "60",
    ]
    assert run.main(args) == 0
    got = store.read_features(features / "offline_cnn_wide.h5")
    assert got.attrs["preprocess"]["input"]["cache"] == "pixels64"
    # The sample's images are 64 px: a 64 px pixel cache resamples once, like the PNGs themselves, so
    # 8-bit files give the very same features; 16-bit ones lose their low bits in the uint8 cache.
    reference = store.read_features(tiny_project.cache_dir / "offline_cnn_wide.h5", names=got.names)
    paths = find_images(tiny_project.data_dir, got.names)
    deep = np.array([bool(p) and Path(p).read_bytes()[24] == 16 for p in paths])
    assert deep.any() and (got.status == 0).sum() > 50
    np.testing.assert_array_equal(got.features[~deep], reference.features[~deep])
    np.testing.assert_allclose(got.features[deep], reference.features[deep], atol=0.05)
    assert list(got.errors) == list(reference.errors)
    assert (
        run.main(["extract", *common, "--backbone", "offline_cnn_wide", "--from-pixels", "offline_cnn"]) == 2
    )
    assert "needs a one-view cache" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.build_parser().parse_args(["extract", "--backbone", "a,,b"])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["evaluate", "--run", "r", "--split", "validation"], "did you mean 'val'?"),
        (["train-head", "--head", "fc", "--backbone", "x", "--dropuot", "0.3"], "did you mean '--dropout'?"),
        (["trian-head"], "did you mean 'train-head'?"),
        (["bench", "heds"], "did you mean 'heads'?"),
    ],
)
def test_an_argument_error_is_one_line_with_a_close_name(argv, expected, capsys):
    with pytest.raises(SystemExit) as end:
        run.main(argv)
    assert end.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "usage: run.py" in err and "--help" in err


def test_an_unknown_head_kind_is_one_line_listing_the_kinds(capsys):
    # --head also takes FILE.py:FUNCTION (a head of one's own), so the kind is checked after parsing.
    assert run.main(["train-head", "--head", "mlp", "--backbone", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'mlp' is not one of: {', '.join(HEAD_KINDS)}" in err


def test_a_mistyped_backbone_names_the_close_one(capsys):
    assert run.main(["extract", "--backbone", "resnet50"]) == 2
    assert "did you mean 'resnet_v2_50'?" in capsys.readouterr().err


def test_every_command_takes_the_folder_flags_and_names_those_it_does_not_use(tmp_path, capsys):
    folders = [
        "--data-dir",
        str(tmp_path / "d"),
        "--cache-dir",
        str(tmp_path / "c"),
        "--runs-dir",
        str(tmp_path / "r"),
    ]
    assert run.main(["report", *folders]) == 2
    err = capsys.readouterr().err
    assert (
        "note: run.py report does not use --cache-dir (it uses only the data folder and the runs folder)"
        in err
    )
    assert "no runs to report" in err  # the real mistake is reached
    assert run.main(["extract", "--backbone", "offline_cnn", *folders]) == 2
    err = capsys.readouterr().err
    assert "does not use --runs-dir" in err and "no Data_Entry_2017" in err
    # Every command and bench's parts parse all three.
    parser = run.build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        parsers = [sub] if name != "bench" else list(sub._subparsers._group_actions[0].choices.values())
        for p in parsers:
            assert {"--config", "--data-dir", "--cache-dir", "--runs-dir"} <= set(p._option_string_actions), (
                name
            )


def test_a_missing_data_folder_suggests_a_sample_beside_it(tmp_path, capsys):
    data = tmp_path / "real"
    assert run.main(["index", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    sample = tmp_path / "real-sample"
    assert err.rstrip().endswith(f"python run.py make-sample --out {sample}")
    assert f"--data-dir {sample}" in err
