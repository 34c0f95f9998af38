"""heads.expert and `evaluate --expert`: Google's adjudicated labels read, mapped to the run's labels and
scored beside the NIH labels on the same images; on a small fixture of the same shape, and on the real
file's rows (downloaded as data from the torchxrayvision wheel, skipped offline)."""

import dataclasses
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import run
from cxr14.errors import InputError
from dataset.settings import LABELS
from results.expert import FINDINGS, expert_metrics, find_expert_files, read_expert_labels
from tests.fixtures import write_cache, write_tiny_config
from tests.pypi_data import package_files

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],Fracture,Pneumothorax,Airspace opacity,"
    "Nodule or mass,Set Id"
)
REAL_NAME = "google2019_nih-chest-xray-labels.csv.gz"
WHEEL = ("torchxrayvision", "1.5.7")  # holds torchxrayvision/data/google2019_nih-chest-xray-labels.csv.gz


def write_fixture(path: Path, names, findings: np.ndarray, sets) -> Path:
    """An expert file of the real one's shape: the NIH columns, then YES/NO per finding and Set Id."""
    lines = [HEADER]
    for name, row, set_id in zip(names, findings, sets, strict=True):
        patient = int(name[:8])
        answers = ",".join("YES" if v else "NO" for v in row)
        lines.append(f"{name},No Finding,0,{patient},50,M,PA,2048,2500,0.168,0.168,{answers},{set_id}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_reading_and_mapping_by_hand(tmp_path):
    names = np.array([f"{i:08d}_000.png" for i in range(1, 9)], dtype=object)
    rng = np.random.default_rng(0)
    findings = np.array([[0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 1, 1], [0, 1, 1, 0]] * 2)
    path = write_fixture(tmp_path / REAL_NAME, names[:8], findings, ["val", "test"] * 4)
    table = read_expert_labels(path)
    assert list(table.columns) == ["name", "set", *FINDINGS] and len(table) == 8
    assert table["Pneumothorax"].tolist() == [1, 0, 0, 1] * 2 and table["set"].iloc[1] == "test"

    scores = rng.random((8, len(LABELS)))
    nih = (rng.random((8, len(LABELS))) < 0.5).astype(np.float32)
    result = expert_metrics(
        expert=table,
        names=names[::-1],  # scored rows in another order: joined by name
        nih_labels=nih[::-1],
        scores=scores[::-1],
        patients=np.arange(8)[::-1],
        label_names=LABELS,
        n_boot=0,
        seed=0,
    )
    assert result["images"] == 8 and result["sets"] == {"test": 4, "val": 4}
    assert "Fracture" in result["skipped"] and set(result["expert"]["labels"]) == set(FINDINGS[1:])
    column = [LABELS.index(n) for n in ("Consolidation", "Pneumonia", "Infiltration", "Edema")]
    opacity = scores[:, column].max(axis=1)
    assert result["expert"]["labels"]["Airspace opacity"]["auc"] == pytest.approx(
        roc_auc_score(findings[:, 2], opacity)
    )
    nih_opacity = nih[:, column].max(axis=1)
    assert result["nih"]["labels"]["Airspace opacity"]["auc"] == pytest.approx(
        roc_auc_score(nih_opacity, opacity)
    )
    nodule = scores[:, [LABELS.index("Nodule"), LABELS.index("Mass")]].max(axis=1)
    assert result["expert"]["labels"]["Nodule or mass"]["auc"] == pytest.approx(
        roc_auc_score(findings[:, 3], nodule)
    )

    partial = expert_metrics(
        expert=table,
        names=names,
        nih_labels=nih[:, :6],
        scores=scores[:, :6],
        patients=np.arange(8),
        label_names=LABELS[:6],
        n_boot=0,
        seed=0,
    )
    assert set(partial["expert"]["labels"]) == {"Nodule or mass"}
    assert "Pneumothorax" in partial["skipped"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace(",YES,", ",MAYBE,", 1), "line 2: .*expected YES or NO"),
        (lambda text: text.replace("Airspace opacity", "Opacity"), "no column 'Airspace opacity'"),
    ],
)
def test_bad_expert_file_names_file_and_line(tmp_path, edit, message):
    path = write_fixture(tmp_path / "x.csv.gz", ["00000001_000.png"], np.array([[1, 1, 1, 1]]), ["test"])
    text = gzip.decompress(path.read_bytes()).decode()
    (tmp_path / "bad.csv").write_text(edit(text))
    with pytest.raises(InputError, match=message):
        read_expert_labels(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="no expert labels found"):
        find_expert_files(tmp_path / "empty")


def test_evaluate_expert_on_the_sample_with_a_fixture(tmp_path, tiny_project, capsys):
    """The sample's test images given expert labels: evaluate --expert scores only those in the test split."""
    from experiments.data import open_config_dataset

    data_dir = tmp_path / "data"
    shutil.copytree(tiny_project.data_dir, data_dir)
    dataset = open_config_dataset(dataclasses.replace(tiny_project, data_dir=data_dir))
    index, assignment = dataset.index, dataset.splits.assignment
    chosen = np.flatnonzero(np.isin(assignment, ("val", "test")))
    findings = np.random.default_rng(1).random((chosen.size, 4)) < 0.4
    write_fixture(data_dir / REAL_NAME, index.names[chosen], findings, assignment[chosen])
    common = [
        "--config",
        str(tiny_project.path),
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    args = [
        "train-head",
        *common,
        "--head",
        "fc",
        "--backbone",
        "offline_cnn",
        "--epochs",
        "2",
        "--name",
        "r",
    ]
    assert run.main(args) == 0
    capsys.readouterr()
    assert run.main(["evaluate", *common, "--run", str(tmp_path / "runs" / "r"), "--expert"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "runs" / "r" / "evaluate-expert-test.json").read_text())
    failed = 3  # the sample's broken files have no features
    assert result["images"] >= int((assignment[chosen] == "test").sum()) - failed
    assert result["images"] <= int((assignment[chosen] == "test").sum())
    assert result["sets"] == {"test": result["images"]} and result["expert_images"] == chosen.size
    assert result["notice"].startswith("synthetic sample")
    assert "Airspace opacity" in out and "skipped: no NIH label" in out and "synthetic sample" in out


def _real_expert_file() -> Path:
    """The real file, cached; fetched once as data from the torchxrayvision wheel (never imported)."""
    return package_files(*WHEEL, {REAL_NAME: f"torchxrayvision/data/{REAL_NAME}"})[REAL_NAME]


def test_evaluate_expert_on_the_real_files_rows(tmp_path):
    """The real file's 4,376 images as a data set (its own NIH columns as the CSV, its sets as the split),
    features that carry the NIH labels, a linear head, then evaluate --expert on the test set."""
    from experiments.config import load_config

    real_file = _real_expert_file()
    real = pd.read_csv(real_file, dtype=str, keep_default_na=False)
    assert len(real) == 4376 and set(real["Set Id"]) == {"val", "test"}
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(real_file, data / REAL_NAME)
    real.iloc[:, :11].to_csv(data / "Data_Entry_2017_v2020.csv", index=False)
    for list_name, set_id in (("train_val_list.txt", "val"), ("test_list.txt", "test")):
        (data / list_name).write_text("\n".join(real["Image Index"][real["Set Id"] == set_id]) + "\n")
    config = load_config(write_tiny_config(tmp_path, "[split]\nval_fraction = 0.3\n"))
    from experiments.data import open_config_dataset

    index = open_config_dataset(config).index
    rng = np.random.default_rng(0)
    features = index.labels @ rng.normal(size=(len(LABELS), 16)) + rng.normal(size=(len(index), 16))
    write_cache(config.cache_dir, "own_features", names=index.names, features=features.astype(np.float16))
    common = ["--config", str(config.path)]
    assert (
        run.main(["train-head", *common, "--head", "linear", "--backbone", "own_features", "--name", "r"])
        == 0
    )
    assert run.main(["evaluate", *common, "--run", str(config.runs_dir / "r"), "--expert"]) == 0
    result = json.loads((config.runs_dir / "r" / "evaluate-expert-test.json").read_text())
    assert result["images"] == int((real["Set Id"] == "test").sum()) and result["sets"] == {"test": 1962}
    assert "notice" not in result
    for finding in ("Pneumothorax", "Airspace opacity", "Nodule or mass"):
        expert, nih = result["expert"]["labels"][finding], result["nih"]["labels"][finding]
        # The features carry the NIH labels, so the NIH-label AUC is high; the experts agree only in part.
        assert nih["auc"] > expert["auc"] > 0.5, finding
        assert expert["positives"] == int((real[finding][real["Set Id"] == "test"] == "YES").sum())
