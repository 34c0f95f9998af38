"""inference/localization.py and evaluate --localization: the pointing game against NIH-shaped box files."""

import gzip

import numpy as np
import pytest
from scipy.stats import binomtest

import run
from cxr14.errors import InputError
from dataset.sample import make_sample
from dataset.settings import LABELS
from experiments.config import load_config
from experiments.experiment import run_localization, run_train_head
from experiments.extract import run_extract
from inference.localization import Box, covered_share, read_boxes
from tests.pypi_data import package_files

# The demo's offline_cnn geometry (128 px, 32 channels, 4 x 4 grid) and a head that trains in seconds.
POINTING_CONFIG = """
[data]
dir = "data"
[paths]
cache_dir = "features"
runs_dir = "runs"
[backbones.grid_cnn]
source = "random"
image_size = 128
preprocess = "standardize"
width = 32
grid = 4
[backbones.grid_map]
source = "random"
image_size = 128
preprocess = "standardize"
width = 32
grid = 4
output = "map"
[train]
epochs = 30
batch_size = 64
lr = 0.003
patience = 4
bootstrap = 20
steps_per_execution = 4
[heads.fc]
units = [64]
dropout = 0.2
[heads.attention]
transition = 32
units = [64]
dropout = 0.0
"""
HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """A head trained on a 600-film sample (128 px); its test split holds ~100 films with boxes."""
    root = tmp_path_factory.mktemp("pointing")
    (root / "cxr14.toml").write_text(POINTING_CONFIG, encoding="utf-8")
    config = load_config(root / "cxr14.toml")
    make_sample(config.data_dir, images=600, size=128, seed=0, broken=0, label_names=config.labels)
    run_extract(config, backbones=["grid_cnn"])
    metrics = run_train_head(config, kind="fc", backbones="grid_cnn", name="fc", force=False)
    return config, metrics["run_dir"]


def test_heatmaps_point_at_the_drawn_findings(sample_run, capsys):
    """The pointing game on the sample's test split, Grad-CAM (the offline backbone's default) through the
    command line, SmoothGrad through the library.

    Measured (this seed, 2 CPU cores): Grad-CAM 60/161 = 0.373, SmoothGrad 45/161 = 0.280, against 0.096
    for a point dropped at random (the share of the film the boxes cover).
    """
    config, run_dir = sample_run
    boxes = config.data_dir / "BBox_List_2017.csv"
    argv = ["evaluate", "--config", str(config.path), "--run", str(run_dir), "--localization", str(boxes)]
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    overall = next(line.split() for line in printed.splitlines() if line.startswith("all "))
    pairs, hits, rate, chance = int(overall[1]), int(overall[2]), float(overall[3]), float(overall[4])
    assert "gradcam" in printed and "test split" in printed and pairs > 120 and 0.05 < chance < 0.15
    print(f"Grad-CAM pointing game: {hits}/{pairs} = {rate:.3f}, chance {chance:.3f}")
    assert rate >= 3 * chance, printed

    smooth = run_localization(config, run_dir=run_dir, bbox_csv=boxes, split="test", method="smoothgrad")
    print(f"SmoothGrad pointing game: {smooth['hits']}/{smooth['pairs']} = {smooth['rate']:.3f}")
    assert smooth["pairs"] == pairs and smooth["chance"] == pytest.approx(chance, abs=5e-4)
    assert smooth["rate"] >= 2 * smooth["chance"], smooth["labels"]


def test_attention_points_into_the_box_more_often_than_chance(sample_run, capsys):
    """The pointing game with an attention head's own weights (--heatmap-method attention): the same
    random backbone's 4 x 4 map kept as 16 tokens (grid_map), so each drawn finding lives in the tokens
    whose cells its box covers, and the head trained on them weighs those tokens most.

    Measured (this seed, 2 CPU cores): 34/161 = 0.211 against chance 0.096 (one-sided binomial p ~ 1e-5;
    Grad-CAM on the fc head's pooled features, 0.373). One map serves every finding of a film, as the
    attention pools once for all labels, so a film with two findings in two places hits at most one.
    """
    config, _ = sample_run
    run_extract(config, backbones=["grid_map"])
    metrics = run_train_head(config, kind="attention", backbones="grid_map", name="attention", force=False)
    boxes = config.data_dir / "BBox_List_2017.csv"
    argv = ["evaluate", "--config", str(config.path), "--run", str(metrics["run_dir"])]
    argv += ["--localization", str(boxes), "--heatmap-method", "attention"]
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    overall = next(line.split() for line in printed.splitlines() if line.startswith("all "))
    pairs, hits, rate, chance = int(overall[1]), int(overall[2]), float(overall[3]), float(overall[4])
    assert "attention" in printed and pairs > 120 and 0.05 < chance < 0.15
    print(f"attention pointing game: {hits}/{pairs} = {rate:.3f}, chance {chance:.3f}")
    assert rate > 1.5 * chance and binomtest(hits, pairs, chance, alternative="greater").pvalue < 0.01, (
        printed
    )


def test_nih_bbox_list_reads_as_984_boxes(tmp_path):
    files = package_files(
        "torchxrayvision", "1.5.7", {"BBox_List_2017.csv.gz": "torchxrayvision/data/BBox_List_2017.csv.gz"}
    )
    csv_path = tmp_path / "BBox_List_2017.csv"
    csv_path.write_bytes(gzip.decompress(files["BBox_List_2017.csv.gz"].read_bytes()))
    boxes = read_boxes(csv_path, labels=LABELS)
    counts = {}
    for found in boxes.values():
        for label, listed in found.items():
            counts[label] = counts.get(label, 0) + len(listed)
    assert sum(counts.values()) == 984 and len(boxes) == 880
    assert counts["Infiltration"] == 123  # spelled "Infiltrate" in that file
    assert set(counts) == set(LABELS[:8])  # the boxes cover the eight diseases Wang et al. list first
    first = boxes["00013118_008.png"]["Atelectasis"][0]
    assert first.x == pytest.approx(225.0847, abs=1e-3) and first.h == pytest.approx(79.1864, abs=1e-3)
    assert all(
        0 <= b.x and b.x + b.w <= 1024 for found in boxes.values() for bs in found.values() for b in bs
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("name,label,x,y,w,h\n", "line 1: expected the header"),
        (HEADER + "a.png,Flu,1,2,3,4\n", "line 2: finding 'Flu'"),
        (HEADER + "a.png,Mass,1,2,3\n", "line 2: expected image name"),
        (HEADER + "a.png,Mass,1,two,3,4\n", "line 2: box"),
        (HEADER + "a.png,Mass,1,2,0,4\n", "must be positive"),
        (HEADER, "holds no boxes"),
    ],
)
def test_bad_box_files_name_the_line(tmp_path, text, message):
    path = tmp_path / "boxes.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_boxes(path, labels=LABELS)
    with pytest.raises(InputError, match="no such box file"):
        read_boxes(tmp_path / "missing.csv", labels=LABELS)


def test_hits_and_chance_by_hand():
    box = Box(x=2, y=1, w=4, h=2)
    assert box.holds(2.0, 1.0) and box.holds(5.5, 2.5) and not box.holds(6.0, 2.0) and not box.holds(3, 3)
    # pixel centres 2.5..5.5 by 1.5..2.5 of a 10 x 8 image: 4 x 2 of 80; a second box overlaps by 2
    assert covered_share([box], height=8, width=10) == pytest.approx(8 / 80)
    assert covered_share([box, Box(x=5, y=2, w=2, h=1)], height=8, width=10) == pytest.approx(9 / 80)


def test_sample_boxes_sit_on_the_drawn_findings(sample_run):
    """Every boxed film of the sample has its finding inside the film, each box at least a few pixels."""
    config, _ = sample_run
    boxes = read_boxes(config.data_dir / "BBox_List_2017.csv", labels=LABELS)
    index_labels = {}
    for line in (config.data_dir / "Data_Entry_2017.csv").read_text().splitlines()[1:]:
        name, findings = line.split(",")[:2]
        index_labels[name] = set(findings.split("|")) - {"No Finding"}
    assert set(boxes) == {name for name, found in index_labels.items() if found}
    for name, found in boxes.items():
        assert set(found) == index_labels[name], name
        for listed in found.values():
            assert all(0 <= b.x and 0 <= b.y and b.x + b.w <= 128 and b.y + b.h <= 128 for b in listed)
            assert all(b.w * b.h >= 4 for b in listed)
    assert np.mean([len(listed) for found in boxes.values() for listed in found.values()]) < 4
