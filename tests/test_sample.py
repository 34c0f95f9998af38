import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr14.errors import InputError
from dataset import chest
from dataset.chest import (
    BOX_BLUR,
    BOX_LEVEL,
    FINDINGS,
    OUTSIDE_LUNGS,
    Canvas,
    change_boxes,
    draw_chest,
    draw_film,
)
from dataset.index import find_images, read_index
from dataset.sample import PREVALENCE_FLOOR, _png_bytes, make_sample
from dataset.settings import LABELS
from dataset.splits import assign_splits, patient_overlap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    return out, make_sample(out, images=120, size=64, seed=7, broken=4)


def test_layout_and_2017_csv_shape(sample):
    out, summary = sample
    assert sorted(p.name for p in out.iterdir()) == [
        "BBox_List_2017.csv",
        "Data_Entry_2017.csv",
        "README_SAMPLE.txt",
        "SYNTHETIC.txt",
        "images",
        "test_list.txt",
        "train_val_list.txt",
    ]
    lines = (out / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
    )
    assert len(lines) == 121
    boxes = (out / "BBox_List_2017.csv").read_text().splitlines()
    assert boxes[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,," and len(boxes) - 1 == summary["boxes"]
    assert not {row.split(",")[0] for row in boxes[1:]} & set(summary["broken"])  # no film, no box
    fields = [line.split(",") for line in lines[1:]]
    assert {len(f) for f in fields} == {12} and {f[11] for f in fields} == {""}
    assert summary["images"] == 120 and len(list((out / "images").iterdir())) == 120


def test_index_reads_it_and_every_image_exists(sample):
    out, summary = sample
    index = read_index(out / "Data_Entry_2017.csv", label_names=LABELS)
    assert len(index) == 120
    assert dict(zip(LABELS, index.labels.sum(axis=0).tolist(), strict=True)) == summary["labels"]
    assert (index.labels.sum(axis=1) == 0).sum() == summary["no_finding"]
    assert index.ages_invalid >= 1  # impossible ages, as in the real 2017 file
    assert set(index.sex) == {"M", "F"} and set(index.view) == {"PA", "AP"}
    assert (find_images(out, index.names) != "").all()  # check-images finds nothing missing
    # Several follow-ups per patient, numbered from 0 without gaps.
    assert len(index) / np.unique(index.patients).size > 2
    for patient in np.unique(index.patients):
        assert sorted(index.follow_up[index.patients == patient]) == list(
            range((index.patients == patient).sum())
        )


def test_official_lists_split_by_patient(sample):
    out, _ = sample
    index = read_index(out / "Data_Entry_2017.csv", label_names=LABELS)
    splits = assign_splits(
        index, data_dir=out, policy="auto", seed=0, fractions=(0.7, 0.1, 0.2), val_fraction=0.1
    )
    assert splits.source == "official"
    assert patient_overlap(index.patients, splits.assignment) == 0
    test = (out / "test_list.txt").read_text().splitlines()
    train_val = (out / "train_val_list.txt").read_text().splitlines()
    assert sorted(test + train_val) == index.names.tolist() and test == sorted(test)
    patients = np.unique(index.patients)
    assert np.unique(index.patients[splits.mask("test")]).size == round(0.2 * patients.size)


def test_the_sample_is_marked_synthetic_and_its_split_never_reads_official(sample, tmp_path):
    import dataclasses

    from cxr14.caveats import SYNTHETIC_NOTICE, is_synthetic
    from dataset.index import format_summary, summarize
    from experiments.config import load_config
    from experiments.data import open_config_dataset

    out, _ = sample
    assert (out / "SYNTHETIC.txt").read_text().startswith(SYNTHETIC_NOTICE)
    config = dataclasses.replace(load_config(Path(__file__).parents[1] / "cxr14.toml"), data_dir=out)
    dataset = open_config_dataset(config)
    assert dataset.synthetic and dataset.splits.source == "synthetic sample (official-format lists)"
    summary = summarize(dataset.index, dataset.splits, synthetic=dataset.synthetic)
    assert summary["synthetic"] is True and format_summary(summary).startswith(f"** {SYNTHETIC_NOTICE} **")
    # A folder made before the marker existed is recognised by its README; a real one is not synthetic.
    old = tmp_path / "old"
    old.mkdir()
    (old / "README_SAMPLE.txt").write_text("made by make-sample")
    assert is_synthetic(old) and not is_synthetic(tmp_path)


def test_file_formats_decode_and_broken_files_exist(sample):
    out, summary = sample
    assert summary["formats"]["rgba"] >= 1 and summary["formats"]["gray16"] >= 1
    modes = {}
    for path in (out / "images").iterdir():
        if path.name in summary["broken"]:
            continue
        with Image.open(path) as image:
            assert image.size == (64, 64)
            modes[image.mode] = modes.get(image.mode, 0) + 1
    assert set(modes) == {"L", "RGBA", "I;16"} or set(modes) == {"L", "RGBA", "I;16B"}
    kinds = {kind: (out / "images" / name).read_bytes() for name, kind in summary["broken"].items()}
    assert sorted(kinds) == ["corrupt", "empty", "not_png", "truncated"]
    assert kinds["empty"] == b""
    assert kinds["truncated"].startswith(PNG_SIGNATURE) and b"IEND" not in kinds["truncated"]
    assert not kinds["not_png"].startswith(PNG_SIGNATURE)
    assert kinds["corrupt"].startswith(PNG_SIGNATURE) and kinds["corrupt"].endswith(b"IEND\xaeB`\x82")
    for data in kinds.values():
        with pytest.raises(Exception):  # noqa: B017 - PIL raises several types; each must fail
            Image.open(io.BytesIO(data)).load()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def files(folder):
        return {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
        }

    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_sample(tmp_path / name, images=25, size=48, seed=seed, broken=2)
    first, again, other = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert again == first
    assert other["Data_Entry_2017.csv"] != first["Data_Entry_2017.csv"]
    assert other["images/00000001_000.png"] != first["images/00000001_000.png"]


@pytest.mark.parametrize(
    "pixels, mode",
    [
        (np.arange(48 * 40, dtype=np.uint32).reshape(48, 40) % 251, "L"),
        (np.arange(48 * 40, dtype=np.uint32).reshape(48, 40) * 31 % 65536, "I;16"),
        (np.arange(48 * 40 * 4, dtype=np.uint32).reshape(48, 40, 4) % 253, "RGBA"),
    ],
)
def test_png_writer_round_trips(pixels, mode):
    pixels = pixels.astype(np.uint16 if mode == "I;16" else np.uint8)
    data = _png_bytes(pixels)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode.startswith(mode)
        np.testing.assert_array_equal(np.asarray(image).astype(pixels.dtype), pixels)
    assert zlib.crc32(data[12:29]) == int.from_bytes(data[29:33], "big")  # IHDR checksum


def test_tensorflow_decodes_every_format_to_the_same_gray():
    tf = pytest.importorskip("tensorflow")
    gray = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    files = {
        "gray8": _png_bytes(gray),
        "gray16": _png_bytes(gray.astype(np.uint16) * 257),
        "rgba": _png_bytes(np.dstack([gray, gray, gray, np.full_like(gray, 255)])),
    }
    for kind, data in files.items():
        decoded = tf.io.decode_png(
            data, channels=1, dtype=tf.uint16 if kind == "gray16" else tf.uint8
        ).numpy()
        expected = gray.astype(np.uint16) * 257 if kind == "gray16" else gray
        np.testing.assert_array_equal(decoded[..., 0], expected, err_msg=kind)


def test_prevalence_has_a_floor_and_keeps_the_real_order(tmp_path):
    summary = make_sample(tmp_path, images=400, size=32, seed=0, broken=0)
    positives = summary["labels"]
    assert min(positives.values()) >= round(PREVALENCE_FLOOR * 400)
    assert max(positives, key=positives.get) == "Infiltration"  # the most common label, as in the real data
    assert positives["Effusion"] > positives["Hernia"]
    assert 0.2 < summary["no_finding"] / 400 < 0.6


def test_label_subset(tmp_path):
    summary = make_sample(tmp_path, images=40, size=32, seed=0, broken=0, label_names=("Mass", "Hernia"))
    assert list(summary["labels"]) == ["Mass", "Hernia"]
    index = read_index(tmp_path / "Data_Entry_2017.csv", label_names=LABELS)
    assert index.labels[:, [LABELS.index("Mass"), LABELS.index("Hernia")]].sum() == sum(
        summary["labels"].values()
    )
    assert index.labels.sum() == sum(summary["labels"].values())


@pytest.mark.parametrize("label", LABELS)
def test_every_label_draws_a_visible_finding(label):
    canvas = Canvas.make(64)

    def film(findings):
        return draw_chest(canvas, np.random.default_rng(1), findings=findings, view="PA", patient=5, seed=0)

    change = np.abs(film((label,)) - film(()))
    # Only the finding differs (noise comes from its own stream), and it must stand out from that noise.
    assert (change > 0.08).sum() >= 20, f"{label} changes only {(change > 0.08).sum()} pixels by > 0.08"
    assert (film(()) == film(())).all()


@pytest.mark.parametrize("label", LABELS)
def test_each_finding_is_boxed_where_it_was_drawn(label):
    canvas = Canvas.make(96)
    film = draw_film(canvas, np.random.default_rng(3), findings=(label,), view="AP", patient=7, seed=0)
    plain = draw_chest(canvas, np.random.default_rng(3), findings=(), view="AP", patient=7, seed=0)
    assert film.boxes[label], f"{label} has no box"
    assert all(0 <= x and 0 <= y and x + w <= 96 and y + h <= 96 for x, y, w, h in film.boxes[label])
    # These three also reshape the anatomy (heart size, lung volume), which moves more pixels than their
    # drawn sign; for the others, where the finding changes the film most lies inside one of its boxes.
    if label not in ("Cardiomegaly", "Emphysema", "Fibrosis"):
        row, col = np.unravel_index(np.argmax(np.abs(film.image - plain)), plain.shape)
        assert any(x <= col < x + w and y <= row < y + h for x, y, w, h in film.boxes[label]), film.boxes
    np.testing.assert_array_equal(
        film.image,
        draw_chest(canvas, np.random.default_rng(3), findings=(label,), view="AP", patient=7, seed=0),
    )


def test_findings_are_learnable_from_pixels(tmp_path):
    # A cheap stand-in for the demo: logistic regression on 16x16 pixels of a small sample.
    sklearn = pytest.importorskip("sklearn.linear_model")
    from sklearn.metrics import roc_auc_score

    make_sample(tmp_path, images=400, size=64, seed=0, broken=0)
    index = read_index(tmp_path / "Data_Entry_2017.csv", label_names=LABELS)
    pixels = np.stack(
        [np.asarray(Image.open(p).convert("L"), np.float32) for p in find_images(tmp_path, index.names)]
    )
    x = pixels.reshape(-1, 16, 4, 16, 4).mean(axis=(2, 4)).reshape(len(index), -1)
    test = np.isin(index.names, (tmp_path / "test_list.txt").read_text().split())
    x = (x - x[~test].mean(axis=0)) / (x[~test].std(axis=0) + 1e-6)
    aucs = []
    for j in range(len(LABELS)):
        model = sklearn.LogisticRegression(C=0.05, max_iter=2000).fit(x[~test], index.labels[~test, j])
        aucs.append(roc_auc_score(index.labels[test, j], model.decision_function(x[test])))
    assert np.mean(aucs) > 0.8, dict(zip(LABELS, np.round(aucs, 2), strict=True))


def test_rewrites_its_own_sample_but_not_a_real_data_set(tmp_path):
    make_sample(tmp_path / "s", images=12, size=32, broken=0)
    make_sample(tmp_path / "s", images=10, size=32, broken=1)
    assert len((tmp_path / "s" / "Data_Entry_2017.csv").read_text().splitlines()) == 11
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "Data_Entry_2017.csv").write_text("real data\n")
    with pytest.raises(InputError, match="make-sample did not write"):
        make_sample(tmp_path / "real", images=10, size=32)
    assert (tmp_path / "real" / "Data_Entry_2017.csv").read_text() == "real data\n"


def test_same_bytes_whatever_the_worker_count_and_a_progress_bar(tmp_path, capsys):
    def files(folder):
        return {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
        }

    alone = make_sample(tmp_path / "one", images=24, size=48, seed=5, broken=2, workers=1)
    bar = capsys.readouterr().err
    assert "make-sample 48 px" in bar and "24/24" in bar
    shared = make_sample(tmp_path / "two", images=24, size=48, seed=5, broken=2, workers=2, progress=False)
    assert capsys.readouterr().err == ""
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert shared == alone | {"out_dir": str(tmp_path / "two")}


def test_a_canvas_of_one_row_and_one_column_draws_what_full_grids_draw():
    canvas = Canvas.make(64)
    x, y = np.meshgrid(canvas.x[0], canvas.y[:, 0])
    grid = Canvas(size=64, x=x, y=y, pixel=canvas.pixel, cell=canvas.cell, weight=canvas.weight)
    findings = ("Effusion", "Fibrosis", "Nodule", "Pneumothorax")
    films = [
        draw_film(c, np.random.default_rng(2), findings=findings, view="PA", patient=1, seed=0)
        for c in (canvas, grid)
    ]
    np.testing.assert_array_equal(films[0].image, films[1].image)
    assert films[0].boxes == films[1].boxes


@pytest.mark.parametrize("label", [name for name in LABELS if name not in ("Cardiomegaly", *OUTSIDE_LUNGS)])
@pytest.mark.parametrize("view", ["PA", "AP"])
def test_a_lung_finding_drawn_on_the_lungs_crop_is_the_one_drawn_on_the_whole_film(label, view):
    canvas = Canvas.make(96)
    body = chest._reshape_for_findings(chest._patient_chest(np.random.default_rng(3), view), (label,))
    heart = chest._heart(canvas, body)
    lungs = {side: mask * (1 - heart) for side, mask in chest._lung_masks(canvas, body).items()}
    plain = np.full((96, 96), 0.5, np.float32)
    whole, cropped = plain.copy(), plain.copy()
    FINDINGS[label](canvas, np.random.default_rng(4), whole, body, lungs)
    boxes = chest._draw_finding(label, canvas, np.random.default_rng(4), cropped, body, lungs, heart=heart)
    np.testing.assert_array_equal(cropped, whole)
    assert boxes == change_boxes(whole - plain) and boxes


@pytest.mark.parametrize(
    "where", [(slice(40, 50), slice(60, 75)), (slice(0, 12), slice(88, 96)), (slice(0, 96),) * 2]
)
def test_boxes_from_the_changed_window_match_blurring_the_whole_film(where):
    from scipy import ndimage

    change = np.zeros((96, 96), np.float32)
    change[where] = np.random.default_rng(0).uniform(0.0, 0.6, change[where].shape)
    change[70:74, 10:13] = 0.5  # a second, small part far away
    whole = ndimage.label(ndimage.gaussian_filter(np.abs(change), BOX_BLUR * 96) >= BOX_LEVEL)[0]
    expected = sorted(
        (c.start, r.start, c.stop - c.start, r.stop - r.start) for r, c in ndimage.find_objects(whole)
    )
    assert sorted(change_boxes(change)) == expected
    assert change_boxes(np.zeros((96, 96), np.float32)) == []


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"images": 0}, "--images must be at least 1"),
        ({"size": 16}, "--size must be at least 32"),
        ({"images": 2, "broken": 3}, "broken files must be between 0 and --images"),
        ({"label_names": ("Mass", "Cancer")}, "unknown label"),
        ({"workers": 0}, "workers must be at least 1"),
    ],
)
def test_bad_arguments(tmp_path, options, expected):
    with pytest.raises(InputError, match=expected):
        make_sample(tmp_path, **{"images": 10, "size": 32, **options})
    assert not (tmp_path / "Data_Entry_2017.csv").exists()
