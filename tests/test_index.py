import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr14.errors import InputError
from dataset.index import count_missing, find_csv, find_images, format_summary, read_index, summarize
from dataset.settings import LABELS
from dataset.splits import Splits

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
# Deliberately not in name order: the index must sort them.
ROWS = [
    "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
    "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
    "00000003_000.png,Hernia,0,3,148,F,AP,2582,2991,0.143,0.143",
    "00000003_001.png,Effusion|Infiltration|Mass,1,3,074Y,F,AP,2048,2500,0.168,0.168",
]


def write_csv(path: Path, rows=ROWS, *, shape: str = "2017", header: str = HEADER) -> Path:
    """A metadata CSV in the 2017 shape (trailing comma on every line) or the v2020 shape."""
    end = "," if shape == "2017" else ""
    path.write_text("".join(f"{line}{end}\n" for line in [header, *rows]), encoding="utf-8")
    return path


@pytest.fixture
def index(tmp_path):
    return read_index(write_csv(tmp_path / "Data_Entry_2017.csv"), label_names=LABELS)


def test_parses_2017_shape_sorted_by_name(index):
    assert list(index.names) == [
        "00000001_000.png",
        "00000001_001.png",
        "00000002_000.png",
        "00000003_000.png",
        "00000003_001.png",
    ]
    assert len(index) == 5
    assert index.labels.dtype == np.uint8 and index.labels.shape == (5, 14)
    on = {
        name: [LABELS[j] for j in np.flatnonzero(row)]
        for name, row in zip(index.names, index.labels, strict=True)
    }
    assert on["00000001_001.png"] == ["Cardiomegaly", "Emphysema"]
    assert on["00000002_000.png"] == []  # No Finding
    assert on["00000003_001.png"] == ["Effusion", "Infiltration", "Mass"]
    assert index.patients.tolist() == [1, 1, 2, 3, 3] and index.patients.dtype == np.int64
    assert index.follow_up.tolist() == [0, 1, 0, 0, 1]
    assert index.sex.tolist() == ["M", "M", "M", "F", "F"]
    assert index.view.tolist() == ["PA", "PA", "PA", "AP", "AP"]
    assert index.width.tolist() == [2682, 2894, 2500, 2582, 2048]
    assert index.height.tolist() == [2749, 2729, 2048, 2991, 2500]


def test_impossible_age_is_missing_and_counted_and_old_spelling_parses(index):
    assert index.age.dtype == np.float32
    assert index.age[:3].tolist() == [57, 58, 81]
    assert np.isnan(index.age[3])  # 148
    assert index.age[4] == 74  # "074Y"
    assert index.ages_invalid == 1


@pytest.mark.parametrize("age", ["", "abc", "58.5.1", "-3"])
def test_missing_or_non_integer_ages_become_nan_and_are_counted(tmp_path, age):
    # Under pandas 3 (what installs today) the parsed ages came back read-only and every command crashed.
    rows = [ROWS[0].replace(",81,", f",{age},"), *ROWS[1:]]
    index = read_index(write_csv(tmp_path / "a.csv", rows), label_names=LABELS)
    assert np.isnan(index.age[2]) and index.ages_invalid == 2  # this one and the 148


def test_ages_are_parsed_into_a_copy_of_a_read_only_array(tmp_path, monkeypatch):
    """The same crash under any pandas: numbers handed out as a read-only array must not be written to."""
    to_numeric = pd.to_numeric

    def read_only_numbers(values, **kwargs):
        array = to_numeric(values, **kwargs).to_numpy(dtype=np.float64, copy=True)
        array.flags.writeable = False
        return pd.Series(array, index=values.index, copy=False)

    monkeypatch.setattr(pd, "to_numeric", read_only_numbers)
    index = read_index(write_csv(tmp_path / "a.csv"), label_names=LABELS)
    assert np.isnan(index.age[3]) and index.ages_invalid == 1


def test_v2020_shape_gives_the_same_index(tmp_path, index):
    other = read_index(write_csv(tmp_path / "v2020.csv", shape="2020"), label_names=LABELS)
    for field in ("names", "labels", "patients", "follow_up", "sex", "view", "width", "height"):
        np.testing.assert_array_equal(getattr(other, field), getattr(index, field), err_msg=field)
    np.testing.assert_array_equal(other.age, index.age)


def test_v2020_sex_column_name_and_blank_lines(tmp_path):
    header = HEADER.replace("Patient Gender", "Patient Sex")
    path = write_csv(tmp_path / "a.csv", [ROWS[0], "", ROWS[1]], shape="2020", header=header)
    assert read_index(path, label_names=LABELS).names.tolist() == ["00000001_001.png", "00000002_000.png"]


def test_label_subset_keeps_configured_columns(tmp_path):
    index = read_index(write_csv(tmp_path / "a.csv"), label_names=("Mass", "Cardiomegaly"))
    assert index.label_names == ("Mass", "Cardiomegaly")
    assert index.labels.tolist() == [[0, 1], [0, 1], [0, 0], [0, 0], [1, 0]]


def test_rows_finds_positions_and_names_the_unknown(index):
    assert index.rows(["00000003_000.png", "00000001_000.png"]).tolist() == [3, 0]
    with pytest.raises(InputError, match="'nope.png' is not in"):
        index.rows(["00000001_000.png", "nope.png"])


def _error(tmp_path, rows=ROWS, header=HEADER) -> str:
    with pytest.raises(InputError) as caught:
        read_index(write_csv(tmp_path / "bad.csv", rows, header=header), label_names=LABELS)
    message = str(caught.value)
    assert "bad.csv" in message
    return message


@pytest.mark.parametrize(
    "row, expected",
    [
        (
            "00000009_000.png,Mass|Cancer,0,9,50,M,PA,1,1,0.1,0.1",
            r"line 4, column 'Finding Labels'.*'Cancer'",
        ),
        ("00000009_000.png,,0,9,50,M,PA,1,1,0.1,0.1", r"line 4.*no label"),
        ("00000009_000.png,No Finding|Mass,0,9,50,M,PA,1,1,0.1,0.1", r"line 4.*together with"),
        ("00000009_000.png,Mass,0,P9,50,M,PA,1,1,0.1,0.1", r"line 4, column 'Patient ID'.*'P9'"),
        ("00000009_000.png,Mass,x,9,50,M,PA,1,1,0.1,0.1", r"line 4, column 'Follow-up #'"),
        ("/data/00000009_000.png,Mass,0,9,50,M,PA,1,1,0.1,0.1", r"line 4.*absolute path"),
        ("C:00000009_000.png,Mass,0,9,50,M,PA,1,1,0.1,0.1", r"line 4.*absolute path"),
        ("..,Mass,0,9,50,M,PA,1,1,0.1,0.1", r"line 4.*contains '\.\.'"),
        ("sub/00000009_000.png,Mass,0,9,50,M,PA,1,1,0.1,0.1", r"line 4.*bare file name"),
        ("00000009_000.png,Mass,0,9,50,X,PA,1,1,0.1,0.1", r"line 4, column 'Patient Gender'.*'X'"),
        ("00000009_000.png,Mass,0,9,50,M,LL,1,1,0.1,0.1", r"line 4, column 'View Position'.*'LL'"),
        ("00000009_000.png,Mass,0,9,50,M,PA,1,1,0.1,0.1,extra,more", r"fields in line 4, saw"),
        # A NUL cannot be stored in a feature file; a 23-digit id overflows int64, a width int32.
        ("0000\x00009_000.png,Mass,0,9,50,M,PA,1,1,0.1,0.1", r"line 4, column 'Image Index'.*control"),
        (
            "00000009_000.png,Mass,0,12345678901234567890123,50,M,PA,1,1,0.1,0.1",
            r"line 4, column 'Patient ID': '12345678901234567890123' is too large",
        ),
        (
            "00000009_000.png,Mass,0,9,50,M,PA,99999999999,1,0.1,0.1",
            r"line 4, column 'OriginalImage\[Width': '99999999999' is too large",
        ),
    ],
)
def test_bad_row_names_file_line_and_problem(tmp_path, row, expected):
    message = _error(tmp_path, rows=[ROWS[0], ROWS[1], row, ROWS[2]])
    assert re.search(expected, message), message


def test_duplicate_name_names_both_lines(tmp_path):
    message = _error(tmp_path, rows=[*ROWS, ROWS[2]])
    assert "line 7: duplicate image name '00000001_000.png' (first on line 4)" in message


def test_first_bad_line_is_reported(tmp_path):
    bad = [r.replace(",M,", ",?,") for r in ROWS]
    assert "line 2," in _error(tmp_path, rows=bad)


def test_missing_column(tmp_path):
    message = _error(tmp_path, header=HEADER.replace("Patient ID", "Patient"))
    assert "line 1: missing column 'Patient ID'" in message


@pytest.mark.parametrize("text", ["", "\n", HEADER + ",\n"])
def test_empty_csv(tmp_path, text):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(InputError, match=r"bad\.csv.*empty"):
        read_index(tmp_path / "bad.csv", label_names=LABELS)


def test_find_csv_either_name_or_explicit(tmp_path):
    with pytest.raises(InputError, match="Data_Entry_2017_v2020.csv or Data_Entry_2017.csv"):
        find_csv(tmp_path)
    write_csv(tmp_path / "Data_Entry_2017.csv")
    assert find_csv(tmp_path).name == "Data_Entry_2017.csv"
    write_csv(tmp_path / "Data_Entry_2017_v2020.csv", shape="2020")
    assert find_csv(tmp_path).name == "Data_Entry_2017_v2020.csv"
    assert find_csv(tmp_path, "Data_Entry_2017.csv").name == "Data_Entry_2017.csv"
    with pytest.raises(InputError, match="mine.csv: metadata CSV not found"):
        find_csv(tmp_path, "mine.csv")


@pytest.mark.parametrize("layout", ["images", "images_001/images", "images_002"])
def test_find_images_in_each_layout(tmp_path, layout):
    (tmp_path / layout).mkdir(parents=True)
    (tmp_path / layout / "b.png").write_bytes(b"x")
    (tmp_path / layout / "c.png").mkdir()  # a folder is not an image
    (tmp_path / layout / "d.png").symlink_to(tmp_path / "gone.png")  # nor is a broken link
    paths = find_images(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    # A folder or broken link is returned, so the extraction can say what is there; it counts as missing.
    assert paths.tolist() == [
        "",
        str(tmp_path / layout / "b.png"),
        str(tmp_path / layout / "c.png"),
        str(tmp_path / layout / "d.png"),
    ]
    assert count_missing(paths) == 3


def test_a_file_wins_over_a_folder_of_the_same_name(tmp_path):
    (tmp_path / "images" / "a.png").mkdir(parents=True)
    (tmp_path / "images_001" / "images").mkdir(parents=True)
    (tmp_path / "images_001" / "images" / "a.png").write_bytes(b"x")
    assert find_images(tmp_path, ["a.png"]).tolist() == [str(tmp_path / "images_001/images/a.png")]


def test_an_unreadable_image_folder_is_one_line(tmp_path, monkeypatch):
    import os

    (tmp_path / "images").mkdir()
    scandir = os.scandir

    def deny(path):  # tests run as root, so chmod cannot make a folder unreadable
        if str(path) == str(tmp_path / "images"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", deny)
    with pytest.raises(InputError, match="images: cannot list the image folder \\(Permission denied\\)"):
        find_images(tmp_path, ["a.png"])


def test_find_images_across_archives_first_folder_wins(tmp_path):
    for folder, name in [("images", "a.png"), ("images_001/images", "b.png"), ("images_012/images", "a.png")]:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"x")
    paths = find_images(tmp_path, ["a.png", "b.png"])
    assert paths.tolist() == [str(tmp_path / "images/a.png"), str(tmp_path / "images_001/images/b.png")]


def test_summarize_counts_and_is_json(index):
    splits = Splits(
        assignment=np.array(["train", "train", "val", "test", "test"], dtype=object), source="official"
    )
    summary = json.loads(json.dumps(summarize(index, splits, missing_images=2)))
    assert summary["images"] == 5 and summary["patients"] == 3 and summary["no_finding"] == 1
    assert summary["labels"]["Cardiomegaly"] == 2 and summary["labels"]["Pneumonia"] == 0
    assert summary["splits"]["train"] == {
        "images": 2,
        "patients": 1,
        "no_finding": 0,
        "labels": {
            name: int(name in ("Cardiomegaly", "Emphysema")) + (name == "Cardiomegaly") for name in LABELS
        },
    }
    assert summary["splits"]["test"]["images"] == 2 and summary["splits"]["val"]["patients"] == 1
    assert summary["split_source"] == "official" and summary["patient_overlap"] == 0
    assert summary["ages_invalid"] == 1 and summary["missing_images"] == 2
    assert summary["views"] == {"PA": 3, "AP": 2} and summary["sexes"] == {"M": 3, "F": 2}
    text = format_summary(summary)
    assert "5 from 3 patients" in text and "missing on disk 2" in text
    assert text.splitlines()[-1].split() == ["Hernia", "1", "0", "0", "1"]


def test_summarize_reports_overlap(index):
    splits = Splits(
        assignment=np.array(["train", "test", "val", "test", "test"], dtype=object), source="frozen"
    )
    assert summarize(index, splits)["patient_overlap"] == 1


def _real_sized_rows(n: int = 112_120):
    rng = np.random.default_rng(0)
    patients = np.sort(rng.integers(1, 30_806, n))
    follow = np.arange(n) - np.searchsorted(patients, patients)  # 0, 1, ... within each patient
    findings = np.array(["No Finding", "Infiltration", "Effusion|Atelectasis", "Mass|Nodule|Hernia"])
    pick = rng.integers(0, 4, n)
    ages = rng.integers(1, 96, n)
    ages[:16] = 412  # the real 2017 file has 16 impossible ages
    return (
        [
            f"{p:08d}_{f:03d}.png,{findings[k]},{f},{p},{a},{'MF'[p % 2]},{'PA' if f % 3 else 'AP'},2500,2048,0.143,0.143"
            for p, f, k, a in zip(
                patients.tolist(), follow.tolist(), pick.tolist(), ages.tolist(), strict=True
            )
        ],
        pick,
        patients,
    )


@pytest.mark.parametrize("shape", ["2017", "2020"])
def test_real_sized_csv_parses_with_right_counts(tmp_path, shape):
    rows, pick, patients = _real_sized_rows()
    path = write_csv(tmp_path / "Data_Entry_2017.csv", rows, shape=shape)
    # Speed is measured by `run.py index --json` on such a file (see the README), not asserted here.
    index = read_index(path, label_names=LABELS)
    assert len(index) == 112_120 and np.unique(index.patients).size == np.unique(patients).size
    positives = dict(zip(LABELS, index.labels.sum(axis=0).tolist(), strict=True))
    assert positives["Infiltration"] == (pick == 1).sum()
    assert positives["Effusion"] == positives["Atelectasis"] == (pick == 2).sum()
    assert positives["Hernia"] == positives["Mass"] == (pick == 3).sum() and positives["Pneumonia"] == 0
    assert (index.labels.sum(axis=1) == 0).sum() == (pick == 0).sum()
    assert index.ages_invalid == 16
    assert (index.names[1:] > index.names[:-1]).all()
