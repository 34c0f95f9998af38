import json

import numpy as np
import pytest

from cxr14.errors import InputError
from experiments.leaderboard import leaderboard
from results.metrics import label_metrics
from results.published import load_published
from results.report import (
    ROC_CORNERS,
    auc_figure,
    plot_auc_comparison,
    plot_roc,
    reliability_figure,
    roc_corner,
    roc_figure,
    write_auc_table,
)

LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
          "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")  # fmt: skip

# Typed in again from issue 4, independently of results/published.csv.
WANG = (.7003, .8100, .7585, .6614, .6933, .6687, .6580, .7993, .7032, .8052, .8330, .7859, .6835, .8717)  # fmt: skip
CHEXNET = (.8094, .9248, .8638, .7345, .8676, .7802, .7680, .8887, .7901, .8878, .9371, .8047, .8062, .9164)  # fmt: skip
BLOG = {
    "Cardiomegaly": (.6770, .7980), "Emphysema": (.7300, .7950), "Effusion": (.5710, .6550),
    "Hernia": (.6590, .6930), "Nodule": (.7210, .7510), "Pneumothorax": (.5210, .6960),
    "Atelectasis": (.6090, .7920), "Pleural_Thickening": (.6440, .6660), "Mass": (.7720, .8420),
    "Edema": (.6390, .6820), "Consolidation": (.7630, .8210), "Infiltration": (.6130, .7060),
    "Fibrosis": (.6950, .7480), "Pneumonia": (.6640, .7200),
}  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_predictions(*, images: int = 240, seed: int = 0, undefined: str | None = "Hernia"):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((images, len(LABELS))) < 0.25).astype(np.uint8)
    if undefined:
        y_true[:, LABELS.index(undefined)] = 0
    y_score = np.clip(y_true * 0.3 + rng.random(y_true.shape) * 0.7, 0, 1)
    return y_true, y_score, np.arange(images) // 3


def fake_metrics(**kwargs) -> dict:
    y_true, y_score, groups = fake_predictions(**kwargs)
    return label_metrics(y_true, y_score, groups=groups, label_names=LABELS, n_boot=50, seed=0)


def write_run(
    runs, name: str, *, metrics: dict, kind: str = "fc", backbones=("resnet",), train=None
) -> object:
    run_dir = runs / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    config = {
        "head": {
            "kind": kind,
            "units": [512, 256],
            "dropout": 0.5,
            "fusion": "add",
            "filters": [32],
            "l2": 0.0,
        },
        "train": {
            "loss": "bce",
            "metadata": False,
            "augment": False,
            "lr": 0.001,
            "seed": 0,
            **(train or {}),
        },
        "backbones": {name: {"source": "random"} for name in backbones},
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def test_published_numbers_are_held_exactly():
    published = load_published()
    assert list(published) == ["blog_resnet_fe", "blog_ensemble", "wang2017", "chexnet"]
    assert published["wang2017"]["auc"] == dict(zip(LABELS, WANG, strict=True))
    assert published["chexnet"]["auc"] == dict(zip(LABELS, CHEXNET, strict=True))
    assert published["blog_resnet_fe"]["auc"] == {label: fe for label, (fe, _) in BLOG.items()}
    assert published["blog_ensemble"]["auc"] == {label: ens for label, (_, ens) in BLOG.items()}
    assert "1705.02315" in published["wang2017"]["citation"]
    assert "official" in published["wang2017"]["split"]
    assert "random" in published["chexnet"]["split"]
    assert all(ref["title"] and ref["citation"] and ref["split"] for ref in published.values())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("source,label,auc\nnobody,Mass,0.7\n", "no '# source:' line"),
        ("# source: a | A | cite | split\nsource,label,auc\na,Mass,1.7\n", "between 0 and 1"),
        ("# source: a | A | cite | split\nsource,label,auc\na,Mass,0.7\na,Mass,0.8\n", "twice"),
        ("# source: a | A\nsource,label,auc\n", "non-empty fields"),
        ("# source: a | A | cite | split\na,Mass,0.7\n", "header"),
    ],
)
def test_bad_reference_file_names_the_line(tmp_path, text, message):
    path = tmp_path / "published.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_published(path)


def test_auc_table_puts_run_beside_references_and_shows_undefined(tmp_path):
    metrics = {**fake_metrics(), "split": "test", "split_source": "official"}
    path = write_auc_table(metrics, tmp_path / "auc.md", label_names=LABELS, run_name="fc-resnet")
    text = path.read_text()
    mass = metrics["labels"]["Mass"]
    row = next(line for line in text.splitlines() if line.startswith("| Mass |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == [
        "Mass",
        str(mass["positives"]),
        f"{mass['auc']:.3f} [{mass['ci'][0]:.3f}, {mass['ci'][1]:.3f}]",
        f"{mass['pr_auc']:.3f}",
        "—",
        "0.772",
        "0.842",
        "0.693",
        "0.868",
    ]  # fmt: skip  (no metadata baseline in these metrics: "—")
    hernia = next(line for line in text.splitlines() if line.startswith("| Hernia |"))
    assert "| 0 | undefined |" in hernia and "0.000" not in hernia
    assert "Undefined in this split" in text and "Hernia" in text.splitlines()[-1]
    mean_row = next(line for line in text.splitlines() if line.startswith("| **Mean**"))
    # published means over the 13 labels the run could score, not all 14
    assert f"{metrics['mean_auc']:.3f}" in mean_row and f"{np.mean(WANG[:-1]):.3f}" in mean_row
    assert "(13 labels)" in mean_row
    assert "official split" in text and "own random" in text
    assert "the test split from the official splits (240 images, 80 patients)" in text


def test_plots_are_written_as_png(tmp_path):
    y_true, y_score, groups = fake_predictions()
    roc = plot_roc(y_true, y_score, tmp_path / "roc.png", label_names=LABELS)
    metrics = label_metrics(y_true, y_score, groups=groups, label_names=LABELS, n_boot=20, seed=0)
    auc = plot_auc_comparison(metrics, tmp_path / "auc.png", label_names=LABELS)
    for path in (roc, auc):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_roc_names_run_and_split_and_tells_14_curves_apart():
    y_true, y_score, _ = fake_predictions()
    figure = roc_figure(y_true, y_score, label_names=LABELS, run_name="fc-resnet", split="val")
    axes = figure.axes[0]
    assert axes.get_title().startswith("ROC per disease: fc-resnet, val split (")
    drawn = [(line.get_color(), line.get_linestyle()) for line in axes.get_lines()[: len(LABELS)]]
    assert len(set(drawn)) == len(LABELS) == 14
    # No colour is used twice, and neighbours in the label order differ in line style too.
    assert len({color for color, _ in drawn}) == 14
    assert all(drawn[j][1] != drawn[j + 1][1] for j in range(13))


def test_roc_zooms_on_the_crowded_corner_and_ranks_the_legend_by_auc():
    y_true, y_score, _ = fake_predictions()
    # Near-perfect scores for most labels: the curves crowd the top-left corner, as on the synthetic sample.
    y_score = np.where(np.arange(len(LABELS)) < 11, y_true * 0.9 + y_score * 0.1, y_score)
    figure = roc_figure(y_true, y_score, label_names=LABELS)
    whole, corner = figure.axes
    side = corner.get_xlim()[1]
    assert side < 0.5 and corner.get_ylim()[0] == pytest.approx(1 - side)
    assert len(corner.get_lines()) == len(LABELS) - 1  # every defined curve, zoomed
    entries = [text.get_text() for text in corner.get_legend().get_texts()]
    aucs = [float(entry.rsplit("(", 1)[1].rstrip(")")) for entry in entries[:-1]]
    assert aucs == sorted(aucs, reverse=True) and entries[-1].startswith("Hernia (undefined")
    assert roc_corner([0.75, 0.8, 0.7]) == ROC_CORNERS[-1] and roc_corner([0.999, 0.998]) == 0.02
    assert roc_corner([]) == ROC_CORNERS[-1]


def test_auc_plot_sets_the_ridge_probe_beside_the_run():
    metrics = fake_metrics()
    probe = {name: 0.61 + 0.01 * j for j, name in enumerate(LABELS)} | {"Hernia": None}
    metrics["reference"] = {"name": "ridge probe", "mean_auc": 0.67, "labels": probe}
    axes = auc_figure(metrics, label_names=LABELS).axes[0]
    (line,) = [line for line in axes.get_lines() if line.get_label().startswith("ridge probe")]
    assert line.get_label() == "ridge probe, same features (mean 0.670)"
    x, y = line.get_data()
    expected = [np.nan if probe[name] is None else probe[name] for name in LABELS]
    np.testing.assert_allclose(x, expected)
    assert (np.diff(y) < 0).all()  # one marker per label, top to bottom, beside (not on) the run's row
    assert "ridge probe" not in " ".join(
        h.get_label() for h in auc_figure(fake_metrics(), label_names=LABELS).axes[0].get_lines()
    )


def test_calibration_plot_shows_the_scores_in_each_bin():
    y_true, y_score, _ = fake_predictions()
    calibrated = np.clip(y_score**1.5, 0, 1)
    figure = reliability_figure(y_true, y_score, calibrated, bins=5, method="platt")
    diagram, counts = figure.axes
    bars = counts.containers
    assert len(bars) == 2  # before and after
    for container, scores in zip(bars, (y_score, calibrated), strict=True):
        expected = np.bincount(np.minimum((scores.ravel() * 5).astype(int), 4), minlength=5)
        assert [int(p.get_height()) for p in container] == expected.tolist()
    written = sorted(int(t.get_text().replace(",", "")) for t in counts.texts if t.get_text())
    assert written == sorted(
        n
        for scores in (y_score, calibrated)
        for n in np.bincount(np.minimum((scores.ravel() * 5).astype(int), 4), minlength=5)
        if n
    )
    assert sum(written) == 2 * y_score.size


@pytest.mark.parametrize(
    "threshold, shown",
    [(0.4, "0.400"), (0.99976, "0.99976"), (0.0000123, "0.000012"), (1.0, "1.000"), (None, "—")],
)
def test_thresholds_print_with_the_places_that_tell_them_apart(tmp_path, threshold, shown):
    metrics = fake_metrics()
    rates = {r: {"value": 0.5, "ci": [0.4, 0.6]} for r in ("sensitivity", "specificity", "ppv", "npv")}
    points = {name: {"threshold": 0.3, **rates} for name in LABELS}
    points["Edema"] = {"threshold": threshold, **rates}
    metrics["operating_points"] = {"method": "youden", "target": None, "in_sample": False, "labels": points}
    text = write_auc_table(metrics, tmp_path / "auc.md", label_names=LABELS, run_name="r").read_text()
    assert f"| Edema | {shown} | 0.500 [0.400, 0.600] |" in text
    assert "| Mass | 0.300 |" in text


def test_a_perfect_auc_is_drawn_whole():
    y_true, y_score, groups = fake_predictions()
    metrics = label_metrics(y_true, y_score, groups=groups, label_names=LABELS, n_boot=0, seed=0)
    metrics["labels"]["Mass"]["auc"] = 1.0
    axes = auc_figure(metrics, label_names=LABELS).axes[0]
    assert axes.get_xlim()[1] > 1.0 and max(axes.get_xticks()) <= 1.0


def test_plot_auc_comparison_without_intervals(tmp_path):
    y_true, y_score, groups = fake_predictions()
    metrics = label_metrics(y_true, y_score, groups=groups, label_names=LABELS, n_boot=0, seed=0)
    path = plot_auc_comparison(metrics, tmp_path / "auc.png", label_names=LABELS)
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_leaderboard_ranks_runs_by_mean_auc(tmp_path):
    weak = fake_metrics(seed=1)
    strong = json.loads(json.dumps(weak))
    strong["mean_auc"] = weak["mean_auc"] + 0.1
    strong["labels"]["Mass"]["auc"] = 0.987
    strong["reference"] = {
        "mean_auc": 0.7,
        "labels": {},
        "penalty": 0.1,
        "difference": 0.0123,
        "difference_ci": [0.004, 0.021],
    }
    runs = [
        write_run(tmp_path, "weak", metrics=weak),
        write_run(tmp_path, "strong", metrics=strong, kind="ensemble", backbones=("a", "b"),
                  train={"loss": "focal", "focal_gamma": 2.0, "metadata": True}),
    ]  # fmt: skip
    lines = [line for line in leaderboard(runs).splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:10] == [
        "#", "run", "mean AUC [95% CI]", "vs best (test) [95% CI]", "head", "backbones", "options",
        "vs ridge probe", "vs metadata baseline", "split (images)",
    ]  # fmt: skip
    assert header[10:] == list(LABELS)
    first = [cell.strip() for cell in lines[2].strip("|").split("|")]
    second = [cell.strip() for cell in lines[3].strip("|").split("|")]
    # Without the data set's labels there is nothing to pair; the best is still marked.
    assert first.pop(3) == "best" and second.pop(3) == "—"
    assert first[:5] == ["1", "strong", first[2], "ensemble", "a+b"]
    assert first[2].startswith(f"{strong['mean_auc']:.3f} [")
    assert "loss=focal" in first[5] and "metadata" in first[5] and "fusion=add" in first[5]
    assert first[6] == "+0.012 [+0.004, +0.021]" and second[6] == "—"  # a run without a reference
    assert first[7] == "—"  # no metadata baseline in these metrics
    assert first[9 + LABELS.index("Mass")] == "0.987"
    assert second[:2] == ["2", "weak"] and second[-1] == "undefined"


def test_leaderboard_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="metrics.json.*train-head"):
        leaderboard([tmp_path / "empty"])
    with pytest.raises(InputError, match="no runs"):
        leaderboard([])
    broken = write_run(tmp_path, "broken", metrics={"mean_auc": 0.7})
    with pytest.raises(InputError, match="broken/metrics.json: no per-label results"):
        leaderboard([broken])


def test_leaderboard_flags_synthetic_runs_and_runs_below_the_metadata_baseline(tmp_path):
    from cxr14.caveats import SYNTHETIC_NOTICE

    metrics = fake_metrics(seed=2)
    below = {
        **metrics,
        "synthetic": True,
        "baselines": {
            "run_minus_metadata": {"difference": -0.012, "ci": [-0.05, 0.03]},
            "beats_metadata": False,
        },
    }
    text = leaderboard([write_run(tmp_path, "weak", metrics=below)])
    assert text.splitlines()[0].startswith(f"**{SYNTHETIC_NOTICE}**")
    row = [cell.strip() for cell in text.splitlines()[-1].strip("|").split("|")]
    assert row[8] == "-0.012 ⚠ not above" and row[9].endswith(", synthetic)")


def test_synthetic_auc_table_drops_published_columns_and_shows_the_operating_points(tmp_path):
    from cxr14.caveats import SYNTHETIC_NOTICE

    metrics = {**fake_metrics(), "split": "test", "split_source": "synthetic sample (official-format lists)"}
    metrics |= {"synthetic": True, "notice": SYNTHETIC_NOTICE}
    points = {
        name: {
            "threshold": 0.4,
            **{r: {"value": 0.5, "ci": [0.4, 0.6]} for r in ("sensitivity", "specificity", "ppv", "npv")},
        }
        for name in LABELS
    }
    metrics["operating_points"] = {
        "method": "sensitivity",
        "target": 0.9,
        "in_sample": False,
        "labels": points,
    }
    text = write_auc_table(metrics, tmp_path / "auc.md", label_names=LABELS, run_name="r").read_text()
    assert text.splitlines()[0].startswith(f"**{SYNTHETIC_NOTICE}.**")
    assert "CheXNet" not in text and "Wang" not in text and "official splits" not in text
    assert "chosen on validation (sensitivity ≥ 0.9), measured on test" in text
    assert "| Mass | 0.400 | 0.500 [0.400, 0.600] |" in text
    auc = plot_auc_comparison(metrics, tmp_path / "auc.png", label_names=LABELS)
    from PIL import Image

    title = Image.open(auc).text["Title"]
    assert title.startswith(SYNTHETIC_NOTICE) and "beside published" not in title
