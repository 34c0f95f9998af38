from pathlib import Path

import numpy as np
import pytest

from cxr14.errors import InputError
from dataset.index import read_index
from dataset.settings import LABELS
from dataset.splits import SPLITS, Splits, assign_splits, patient_overlap, write_split_lists

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


def write_data(folder: Path, *, patients: int = 40, per_patient: int = 3) -> Path:
    """A 2017-shape CSV with `per_patient` follow-ups for each patient; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        f"{p:08d}_{f:03d}.png,No Finding,{f},{p},40,F,PA,2500,2048,0.143,0.143,"
        for p in range(1, patients + 1)
        for f in range(per_patient)
    ]
    (folder / "Data_Entry_2017.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    return folder


def load(folder: Path):
    return read_index(folder / "Data_Entry_2017.csv", label_names=LABELS)


def write_official(folder: Path, index, *, test_patients) -> None:
    """Official-style lists: every image of the given patients in test_list.txt, the rest in train_val."""
    is_test = np.isin(index.patients, list(test_patients))
    (folder / "train_val_list.txt").write_text("".join(f"{n}\n" for n in index.names[~is_test]))
    (folder / "test_list.txt").write_text("".join(f"{n}\n" for n in index.names[is_test]))


def split(index, folder, policy, *, seed=0, fractions=(0.7, 0.1, 0.2), val_fraction=0.1, frozen_dir=""):
    return assign_splits(
        index,
        data_dir=folder,
        policy=policy,
        seed=seed,
        fractions=fractions,
        val_fraction=val_fraction,
        frozen_dir=frozen_dir,
    )


def patients_in(index, splits, name):
    return set(index.patients[splits.mask(name)].tolist())


def test_patient_random_keeps_patients_together_in_seeded_proportions(tmp_path):
    folder = write_data(tmp_path, patients=100)
    index = load(folder)
    splits = split(index, folder, "patient-random")
    assert splits.source == "patient-random"
    assert set(splits.assignment) == set(SPLITS)
    assert [len(patients_in(index, splits, s)) for s in SPLITS] == [70, 10, 20]
    assert patient_overlap(index.patients, splits.assignment) == 0
    again = split(index, folder, "patient-random")
    np.testing.assert_array_equal(again.assignment, splits.assignment)
    other = split(index, folder, "patient-random", seed=1)
    assert (other.assignment != splits.assignment).any()


def test_auto_is_patient_random_without_both_official_lists(tmp_path):
    folder = write_data(tmp_path)
    index = load(folder)
    (folder / "test_list.txt").write_text(index.names[0] + "\n")  # only one of the two lists
    assert split(index, folder, "auto").source == "patient-random"


def test_official_lists_with_val_carved_from_train_val_by_patient(tmp_path):
    folder = write_data(tmp_path, patients=50)
    index = load(folder)
    write_official(folder, index, test_patients=range(1, 11))
    for policy in ("auto", "official"):
        splits = split(index, folder, policy, val_fraction=0.25)
        assert splits.source == "official"
        assert patients_in(index, splits, "test") == set(range(1, 11))
        val = patients_in(index, splits, "val")
        assert len(val) == 10 and val.isdisjoint(range(1, 11))  # 25% of the 40 train_val patients
        assert len(patients_in(index, splits, "train")) == 30
    other = split(index, folder, "official", seed=5, val_fraction=0.25)
    assert patients_in(index, other, "val") != val
    assert patients_in(index, other, "test") == set(range(1, 11))


def test_official_list_sharing_a_patient_is_refused(tmp_path):
    folder = write_data(tmp_path)
    index = load(folder)
    write_official(folder, index, test_patients=[1, 2])
    # Move one image of patient 3 into the test list: patient 3 is now in two splits.
    train_val = (folder / "train_val_list.txt").read_text().splitlines()
    moved = "00000003_001.png"
    (folder / "train_val_list.txt").write_text("".join(f"{n}\n" for n in train_val if n != moved))
    with open(folder / "test_list.txt", "a") as f:
        f.write(moved + "\n")
    with pytest.raises(InputError, match=r"1 patient\(s\) are in more than one split.*patient 3"):
        split(index, folder, "official")


@pytest.mark.parametrize(
    "line, refusal",
    [
        ("\n99999999_000.png\n", r"test_list\.txt: line 5: image '99999999_000\.png' is not in"),
        ("00000001_000.png\n", r"test_list\.txt: line 4: .* listed twice"),
    ],
)
def test_an_unknown_or_repeated_image_in_a_list_is_refused_naming_file_and_line(tmp_path, line, refusal):
    folder = write_data(tmp_path)
    index = load(folder)
    write_official(folder, index, test_patients=[1])
    with open(folder / "test_list.txt", "a") as f:
        f.write(line)
    with pytest.raises(InputError, match=refusal):
        split(index, folder, "official")


def test_image_in_both_lists_or_in_neither_is_refused(tmp_path):
    folder = write_data(tmp_path)
    index = load(folder)
    write_official(folder, index, test_patients=[1])
    train_val = (folder / "train_val_list.txt").read_text().splitlines()
    (folder / "train_val_list.txt").write_text("".join(f"{n}\n" for n in train_val[1:]))
    with pytest.raises(InputError, match=r"1 image\(s\).*in none of.*'00000002_000\.png'"):
        split(index, folder, "official")
    (folder / "train_val_list.txt").write_text("".join(f"{n}\n" for n in [*train_val, "00000001_000.png"]))
    with pytest.raises(InputError, match=r"'00000001_000\.png' is in more than one"):
        split(index, folder, "official")


def test_official_without_lists_says_what_to_do(tmp_path):
    folder = write_data(tmp_path)
    with pytest.raises(InputError, match="train_val_list.txt: split list not found.*patient-random"):
        split(load(folder), folder, "official")


def test_written_lists_freeze_a_split(tmp_path):
    folder = write_data(tmp_path, patients=30)
    index = load(folder)
    splits = split(index, folder, "patient-random", seed=3)
    paths = write_split_lists(index, splits, tmp_path / "frozen")
    assert [p.name for p in paths] == ["train_list.txt", "val_list.txt", "test_list.txt"]
    assert paths[2].read_text().splitlines() == index.names[splits.mask("test")].tolist()
    frozen = split(index, folder, "frozen", frozen_dir=str(tmp_path / "frozen"))
    assert frozen.source == "frozen"
    np.testing.assert_array_equal(frozen.assignment, splits.assignment)
    with pytest.raises(InputError, match="needs split.frozen_dir"):
        split(index, folder, "frozen")
    paths[1].unlink()
    with pytest.raises(InputError, match="val_list.txt: split list not found"):
        split(index, folder, "frozen", frozen_dir=str(tmp_path / "frozen"))


@pytest.mark.parametrize(
    "options, expected",
    [
        (
            {"policy": "random"},
            "unknown split policy 'random'; valid: auto, official, patient-random, frozen",
        ),
        ({"policy": "patient-random", "fractions": (0.5, 0.1, 0.1)}, "split.fractions must be"),
        ({"policy": "patient-random", "fractions": (0.9, 0.1)}, "split.fractions must be"),
    ],
)
def test_bad_options_are_refused(tmp_path, options, expected):
    folder = write_data(tmp_path)
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        split(load(folder), folder, **options)


def test_bad_val_fraction(tmp_path):
    folder = write_data(tmp_path)
    index = load(folder)
    write_official(folder, index, test_patients=[1])
    with pytest.raises(InputError, match=r"val_fraction must be in \[0, 1\)"):
        split(index, folder, "official", val_fraction=1.0)


def test_patient_overlap_counts_patients_not_images():
    patients = np.array([1, 1, 1, 2, 2, 3, 3])
    assignment = np.array(["train", "test", "val", "val", "val", "train", "test"], dtype=object)
    assert patient_overlap(patients, assignment) == 2
    assert patient_overlap(patients[3:5], assignment[3:5]) == 0


def test_mask_and_unknown_split():
    splits = Splits(assignment=np.array(["train", "test", "train"], dtype=object), source="frozen")
    assert splits.mask("train").tolist() == [True, False, True]
    assert not splits.mask("val").any()
    with pytest.raises(InputError, match="unknown split 'dev'; valid: train, val, test"):
        splits.mask("dev")
