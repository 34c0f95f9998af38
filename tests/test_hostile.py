"""Hostile inputs, one family a test: paths outside their folders, tracebacks where a line belongs,
memory that follows a header, refusals that say the wrong thing, concurrent runs, and a run folder
predict must not trust. Each on data the test makes."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

import run
from cache.status import Status
from cxr14.errors import InputError
from dataset.image_loader import ImageError, check_file, read_gray01
from dataset.index import count_missing, find_images
from dataset.settings import SplitConfig, check_fractions
from experiments.config import load_config
from experiments.sweep import _finished, check_grid_size
from heads.run_folder import MARKER, claim_run, finish_run, read_config, read_decisions, refuse_existing
from heads.settings import HeadConfig, TrainConfig
from inference.predict import predict_images
from results.record import write_results
from results.settings import DecisionConfig
from tests.fixtures import (
    TINY,
    add_decisions,
    make_config,
    make_run,
    write_dicom,
    write_png,
    write_tiny_config,
)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- writes outside the folders the user named ------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "..", "a/b", ".hidden"])
def test_run_names_stay_inside_the_runs_folder(tmp_path, capsys, name):
    config = write_tiny_config(tmp_path)
    args = ["train-head", "--config", str(config), "--head", "fc", "--backbone", "offline_cnn"]
    assert run.main([*args, "--name", name, "--force"]) == 2
    assert "must be a plain name" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cxr14.toml"]  # nothing written anywhere


def test_sweep_names_stay_inside_the_runs_folder(tmp_path, capsys):
    config = write_tiny_config(tmp_path)
    grid = tmp_path / "grid.toml"
    grid.write_text('head = ["fc"]\nbackbone = ["offline_cnn"]\n', encoding="utf-8")
    assert run.main(["sweep", "--config", str(config), "--grid", str(grid), "--name", "../up"]) == 2
    assert "must be a plain name" in _one_line_error(capsys)


def test_force_replaces_only_run_folders_the_project_made(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("the user's own file")
    with pytest.raises(InputError, match="not a run folder this project made"):
        refuse_existing(mine, force=True)
    assert (mine / "config.json").read_text() == "the user's own file"
    made = tmp_path / "made"
    with claim_run(made, force=False) as tmp:
        (tmp / "metrics.json").write_text("{}")
        finish_run(tmp, made)
    assert (made / MARKER).is_file()
    refuse_existing(made, force=True)  # a folder the project made may be replaced
    with pytest.raises(InputError, match="exists; pick another run name"):
        refuse_existing(made, force=False)


def test_backbone_names_are_file_names_inside_the_cache_folder(tmp_path):
    config = write_tiny_config(
        tmp_path, '[backbones."../../evil"]\nsource = "random"\nimage_size = 32\npreprocess = "unit"\n'
    )
    with pytest.raises(
        InputError, match=r"backbones\.\.\./\.\./evil\] name = '\.\./\.\./evil' must be a plain"
    ):
        load_config(config)


# --- tracebacks where a line belongs ----------------------------------------------------------------------


def test_output_targets_are_checked_before_any_work(tmp_path, capsys):
    image = write_png(tmp_path / "a.png")
    folder = tmp_path / "folder"
    folder.mkdir()
    # The run does not even exist: the target is refused first, before any prediction is made.
    for target, says in ((folder, "is a folder"), (tmp_path / "missing" / "p.csv", "does not exist")):
        assert run.main(["predict", "--run", "nope", "--csv", str(target), str(image)]) == 2
        assert says in _one_line_error(capsys)
    config = write_tiny_config(tmp_path)
    assert run.main(["report", "--config", str(config), "--out", str(folder)]) == 2
    assert "is a folder" in _one_line_error(capsys)
    run_dir = make_run(tmp_path / "runs" / "fc", [TINY])
    flat = tmp_path / "flat"
    flat.write_text("a file")
    assert run.main(["predict", "--run", str(run_dir), "--heatmap", str(flat), str(image)]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert run.main(["export", "--run", str(run_dir), "--out", str(flat / "model")]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)


def test_bad_config_files_and_folders_are_one_line(tmp_path, capsys):
    folder = tmp_path / "conf"
    folder.mkdir()
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\n")
    for config, says in ((folder, "is a folder"), (latin, "not UTF-8")):
        assert run.main(["index", "--config", str(config)]) == 2
        assert says in _one_line_error(capsys)
    config = write_tiny_config(tmp_path)
    runs_file = tmp_path / "runs-file"
    runs_file.write_text("")
    args = ["train-head", "--config", str(config), "--head", "fc", "--backbone", "offline_cnn"]
    assert run.main([*args, "--runs-dir", str(runs_file)]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    # Any other OSError: one line naming the path (here make-sample into a file's "folder").
    assert run.main(["make-sample", "--out", str(runs_file / "sample"), "--images", "10"]) == 2
    assert str(runs_file) in _one_line_error(capsys)


def _hostile_dicoms(folder: Path) -> dict[str, tuple[Path, str]]:
    pixels = (np.random.default_rng(0).random((40, 48)) * 4095).astype(np.uint16)
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4096, 0, 64])
    lut.add_new("LUTData", "US", list(range(4096)))
    films = {
        "window0": ({"WindowCenter": 2000, "WindowWidth": 0}, "WindowWidth = 0"),
        "nan-window": ({"WindowCenter": "nan", "WindowWidth": "nan"}, "WindowWidth = nan"),
        "slope0": ({"RescaleSlope": 0, "RescaleIntercept": 0}, "RescaleSlope = 0"),
        "bits0": ({"BitsStored": 0}, "BitsStored = 0 with 16-bit pixels"),
        "lut64": ({"VOILUTSequence": [lut]}, "64-bit VOI LUT"),
        "frames": ({"NumberOfFrames": "97"}, "NumberOfFrames = 'ab', not a number"),
    }
    made = {}
    for name, (attributes, says) in films.items():
        path = write_dicom(folder / f"{name}.dcm", pixels, **attributes)
        if name == "frames":  # a value pydicom refuses to write: put it in the bytes
            path.write_bytes(path.read_bytes().replace(b"97", b"ab"))
        made[name] = (path, says)
    blank = write_dicom(folder / "blank.dcm", np.full((40, 48), 7, np.uint16))
    made["blank"] = (blank, "decodes to a blank film")
    return made


def test_dicom_headers_pydicom_rejects_are_failed_images(tmp_path):
    films = _hostile_dicoms(tmp_path)
    for name, (path, says) in films.items():
        if name != "blank":  # a blank film has a good header: it fails where it is decoded
            status, reason = check_file(path)
            assert status == Status.UNDECODABLE and says in reason and str(path) in reason, name
        with pytest.raises(ImageError, match="DICOM") as err:
            read_gray01(path)
        assert says in err.value.reason, name
    good = write_png(tmp_path / "good.png")
    run_dir = make_run(tmp_path / "runs" / "fc", [TINY])
    paths = [good, *(path for path, _ in films.values())]
    results = predict_images(run_dir=run_dir, inputs=paths, extract=make_config(tmp_path).extract)
    assert results[0]["error"] is None and all(r["error"] and "DICOM" in r["error"] for r in results[1:])


# --- memory that follows the attacker -----------------------------------------------------------------------


def test_a_deflated_dicom_is_refused_before_it_is_inflated_past_the_limit(tmp_path):
    zeros = np.zeros((2048, 2048), np.uint16)
    zeros[0, 0] = 1
    path = write_dicom(tmp_path / "bomb.dcm", zeros)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.Rows, ds.Columns = 40, 48  # the header lies: 8 MB of pixels follow
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 64 * 1024
    status, reason = check_file(path, max_pixels=10_000)
    assert status == Status.UNDECODABLE and "deflated DICOM inflates to more than" in reason
    small = (np.random.default_rng(1).random((40, 48)) * 4095).astype(np.uint16)
    honest = pydicom.dcmread(write_dicom(tmp_path / "honest.dcm", small))
    honest.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    honest.save_as(tmp_path / "honest.dcm", enforce_file_format=True)
    assert read_gray01(tmp_path / "honest.dcm", max_pixels=10_000).shape == (40, 48, 1)


# --- refusals that say the wrong thing ----------------------------------------------------------------------


def test_a_link_loop_or_to_a_device_is_one_failed_image_named(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "good.png")
    os.symlink(images / "loop.png", images / "loop.png")
    os.symlink("/dev/zero", images / "zero.png")
    paths = find_images(tmp_path, ["good.png", "loop.png", "zero.png"])
    assert count_missing(paths) == 2  # not a refusal of the whole data set
    assert check_file(paths[0]) == (Status.OK, "")
    assert "symbolic-link loop" in check_file(paths[1])[1] and "loop.png" in check_file(paths[1])[1]
    assert "symbolic link to /dev/zero, which is not a regular file" in check_file(paths[2])[1]


def test_a_grid_too_large_is_refused_with_the_cap(tmp_path, capsys):
    axes = {key: list(range(10)) for key in ("lr", "dropout", "seed", "epochs", "patience", "batch_size")}
    with pytest.raises(InputError, match="1,000,000 combinations .* --max-trials"):
        check_grid_size(axes, most=1000, path=Path("grid.toml"))
    assert check_grid_size(axes, most=10**6, path=Path("grid.toml")) == 10**6
    grid = tmp_path / "grid.toml"
    values = ", ".join(str(v) for v in range(1, 101))  # each value valid alone: only their number is refused
    grid.write_text(f'head = ["fc"]\nbackbone = ["a"]\nseed = [{values}]\nepochs = [{values}]\n')
    assert run.main(["sweep", "--config", str(write_tiny_config(tmp_path)), "--grid", str(grid)]) == 2
    assert "10,000 combinations" in _one_line_error(capsys)


# --- NaN and absurd sizes at the config edge ----------------------------------------------------------------


def test_nan_and_absurd_values_pass_no_range_check(tmp_path, capsys):
    nan = float("nan")
    for make, says in (
        (lambda: HeadConfig(kind="fc", dropout=nan), "heads.fc.dropout = nan must be a finite number"),
        (lambda: DecisionConfig(target=nan), "decision.target = nan"),
        (lambda: TrainConfig(focal_gamma=math.inf), "train.focal_gamma = inf"),
        (lambda: TrainConfig(seed=2**32), "out of range"),
        (lambda: SplitConfig(seed=2**40), "out of range"),
        (lambda: TrainConfig(bootstrap=10**9), "train.bootstrap"),
        (lambda: HeadConfig(kind="fc", units=(10**9,)), "each between 1 and 65,536"),
        (lambda: HeadConfig(kind="cnn", filters=(8,) * 40), "at most 16 sizes"),
        (lambda: HeadConfig(kind="ensemble", transition=10**8), "heads.ensemble.transition"),
        (lambda: check_fractions([nan, nan, nan]), "three non-negative numbers summing to 1"),
    ):
        with pytest.raises(InputError, match=says.replace(".", r"\.").replace("(", r"\(")):
            make()
    config = write_tiny_config(tmp_path)
    args = ["train-head", "--config", str(config), "--head", "fc", "--backbone", "offline_cnn"]
    for flag, value in (("--dropout", "nan"), ("--target", "nan")):
        assert run.main([*args, flag, value]) == 2
        assert "must be a finite number" in _one_line_error(capsys)
    with pytest.raises(SystemExit) as exit_:
        run.main([*args, "--seed", str(2**32)])
    assert exit_.value.code == 2 and "a seed is at most" in capsys.readouterr().err


@pytest.mark.parametrize("raised", ["interrupt", "system-error"])
def test_ctrl_c_always_ends_in_the_one_interrupted_line(tmp_path, capsys, monkeypatch, raised):
    def interrupted(args, config):
        if raised == "interrupt":
            raise KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:  # what TensorFlow's C++ code surfaces after Ctrl-C inside it
            raise SystemError("<built-in function ...> returned a result with an exception set")  # noqa: B904

    monkeypatch.setattr(run, "cmd_index", interrupted)
    assert run.main(["index", "--config", str(write_tiny_config(tmp_path))]) == 130
    assert capsys.readouterr().err.strip() == (
        "interrupted; finished work is kept, rerun the same command to resume"
    )


# --- concurrency ------------------------------------------------------------------------------------------------


def test_two_runs_of_one_name_cannot_both_claim_it(tmp_path):
    run_dir = tmp_path / "runs" / "same"
    with claim_run(run_dir, force=False) as first:
        with pytest.raises(InputError, match="another run of this name is being written now"):
            with claim_run(run_dir, force=True):
                pass
        (first / "metrics.json").write_text("{}")
        finish_run(first, run_dir)
    with pytest.raises(InputError, match="exists"):  # the second, started later, finds it finished
        with claim_run(run_dir, force=False):
            pass
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["same"]  # no lock or temporary left


def test_a_resumed_sweep_reuses_a_trial_only_when_its_settings_match(tmp_path):
    trial = tmp_path / "trial"
    trial.mkdir()
    settings = {"head": {"kind": "fc", "units": (16,)}, "train": {"lr": 0.01}, "labels": ["A", "B"]}
    (trial / "config.json").write_text(json.dumps(settings))
    metrics = {"split": "val", "images": 4, "mean_auc": 0.7, "mean_ci": [None, None], "labels": {}}
    write_results(trial / "metrics.json", metrics)  # a finished trial's results, as train_head writes them
    done, why = _finished(trial, snapshot_now=settings)
    assert done["mean_auc"] == 0.7 and why == ""
    changed = settings | {"train": {"lr": 0.1}}  # say, [fixed] lr edited between the two runs
    assert _finished(trial, snapshot_now=changed) == (None, "its train settings differ from the grid's now")
    (trial / "metrics.json").write_text('{"mean_auc": 0.7')  # cut short by a kill
    done, why = _finished(trial, snapshot_now=settings)
    assert done is None and "damaged" in why


# --- predict trusts nothing ---------------------------------------------------------------------------------


def test_damaged_run_files_are_one_line(tmp_path):
    run_dir = make_run(tmp_path / "runs" / "fc", [TINY])
    add_decisions(run_dir)
    thresholds = json.loads((run_dir / "thresholds.json").read_text())
    thresholds["labels"]["Atelectasis"]["threshold"] = "high"
    (run_dir / "thresholds.json").write_text(json.dumps(thresholds))
    with pytest.raises(InputError, match=r"thresholds.json: labels\['Atelectasis'\] threshold = 'high'"):
        read_decisions(run_dir)
    add_decisions(run_dir)
    calibration = json.loads((run_dir / "calibration.json").read_text())
    calibration["labels"]["Mass"] = {"a": [1], "b": 0}
    (run_dir / "calibration.json").write_text(json.dumps(calibration))
    with pytest.raises(InputError, match=r"calibration.json: labels\['Mass'\] a = \[1\] is not a finite"):
        read_decisions(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "train"}))
    with pytest.raises(InputError, match="config.json: no 'train' table"):
        read_config(run_dir)


def test_predict_refuses_swapped_labels_and_nan_weights(tmp_path):
    import keras

    image = write_png(tmp_path / "a.png")
    extract = make_config(tmp_path).extract
    run_dir = make_run(tmp_path / "runs" / "fc", [TINY])
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({"labels": {name: {} for name in config["labels"]}}))
    assert predict_images(run_dir=run_dir, inputs=[image], extract=extract)[0]["error"] is None
    swapped = list(config["labels"])
    swapped[0], swapped[1] = swapped[1], swapped[0]
    (run_dir / "config.json").write_text(json.dumps(config | {"labels": swapped}))
    with pytest.raises(InputError, match="differ from those the run was trained and scored on"):
        predict_images(run_dir=run_dir, inputs=[image], extract=extract)
    (run_dir / "config.json").write_text(json.dumps(config))
    model = keras.saving.load_model(run_dir / "model.keras")
    model.layers[-1].kernel.assign(np.full(model.layers[-1].kernel.shape, np.nan))
    model.save(run_dir / "model.keras")
    with pytest.raises(InputError, match="holds NaN or infinite values"):
        predict_images(run_dir=run_dir, inputs=[image], extract=extract)


def test_predict_on_a_folder_says_what_it_left_out(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_png(folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    run_dir = make_run(tmp_path / "runs" / "fc", [TINY])
    results = predict_images(run_dir=run_dir, inputs=[folder], extract=make_config(tmp_path).extract)
    assert [(Path(r["image"]).name, r["error"]) for r in results] == [
        ("a.png", None),
        ("notes.txt", "left out: not a .png or .dcm file"),
    ]
