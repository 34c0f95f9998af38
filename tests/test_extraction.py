"""The extraction loop: failures recorded, kill + resume, shard workers, fingerprints, views, pixels,
several backbones in one pass, and a pixel cache as the input."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import tensorflow as tf

from cache import store
from cache.origin import index_fingerprint
from cache.status import Status
from cxr14.errors import Fix, InputError
from dataset import image_loader
from extract import extraction
from extract.inputs import PixelInput
from tests.fixtures import SIZE, FakeBackbone, extract, kill_mid_pass, second_backbone, small_pngs

ROOT = Path(__file__).resolve().parents[1]


def write_png(path: Path, image: np.ndarray) -> bytes:
    data = tf.io.encode_png(image).numpy()
    path.write_bytes(data)
    return data


@pytest.fixture
def images(tmp_path):
    """12 small PNGs (rows sorted by name) with one of each failure kind among them."""
    folder = tmp_path / "images"
    names, paths = small_pngs(folder, 12)
    paths[3] = ""  # MISSING: the index names an image with no file
    (folder / names[5]).write_bytes(b"")  # EMPTY
    png = (folder / names[7]).read_bytes()
    (folder / names[7]).write_bytes(png[: len(png) // 2])  # TRUNCATED
    (folder / names[8]).write_bytes(b"GIF89a not a png at all")  # UNDECODABLE, caught by the cheap check
    corrupt = bytearray((folder / names[10]).read_bytes())
    start = corrupt.find(b"IDAT") + 4
    corrupt[start : start + 12] = bytes(b ^ 0xFF for b in corrupt[start : start + 12])
    (folder / names[10]).write_bytes(bytes(corrupt))  # UNDECODABLE, only decoding finds out
    return names, paths


EXPECTED_STATUS = {
    3: Status.MISSING,
    5: Status.EMPTY,
    7: Status.TRUNCATED,
    8: Status.UNDECODABLE,
    10: Status.UNDECODABLE,
}


def index_of(names, *, seed=0):
    """An index of `names`: a patient each, two labels drawn by `seed`."""
    labels = np.random.default_rng(seed).integers(0, 2, size=(len(names), 2), dtype=np.uint8)
    return SimpleNamespace(names=np.asarray(names, dtype=object), patients=np.arange(len(names)), labels=labels,
                           label_names=("Mass", "Nodule"), csv_path=Path(f"data{seed}/Data_Entry_2017.csv"))  # fmt: skip


def dataset_of(names, *, seed=0) -> dict:
    """The data set fingerprint of `index_of(names, seed=seed)`."""
    return index_fingerprint(index_of(names, seed=seed), rows=np.arange(len(names)))


def assert_same_file(a: Path, b: Path):
    x, y = store.read_features(a), store.read_features(b)
    assert x.features.tobytes() == y.features.tobytes()
    assert list(x.names) == list(y.names) and list(x.errors) == list(y.errors)
    np.testing.assert_array_equal(x.status, y.status)
    assert {k: v for k, v in x.attrs.items() if k != "created"} == {
        k: v for k, v in y.attrs.items() if k != "created"
    }


def test_every_failure_kind_is_recorded_and_good_rows_match_the_backbone(images, tmp_path):
    names, paths = images
    summary = extract(names, paths, tmp_path / "cache", progress=True, dataset=dataset_of(names))
    got = store.read_features(summary.path)
    assert summary.path == tmp_path / "cache" / "fake.h5"
    assert got.attrs["dataset"] == dataset_of(names) and set(got.attrs["checksums"]) == set(store.DATASETS)
    for row, status in EXPECTED_STATUS.items():
        assert got.status[row] == status, (row, got.errors[row])
        assert names[row] in got.errors[row] or "no image file of this name" in got.errors[row]
        assert not got.features[row].any()
    assert "IEND" in got.errors[7] and "not a PNG" in got.errors[8] and "cannot be decoded" in got.errors[10]
    ok = [row for row in range(12) if row not in EXPECTED_STATUS]
    assert (got.status[ok] == Status.OK).all() and (got.errors[ok] == "").all()
    backbone = FakeBackbone()
    for row in ok:
        expected = backbone.fn(image_loader.load_image(paths[row], backbone.spec)[None]).numpy()[0]
        np.testing.assert_array_equal(got.features[row], expected.astype(np.float16))
    assert (summary.done, summary.failed, summary.shards_done, summary.shards_skipped) == (7, 5, 3, 0)
    assert [name for name, _ in summary.failures] == [names[row] for row in EXPECTED_STATUS]
    assert summary.images_per_s > 0
    assert got.attrs["fingerprint"] and got.attrs["image_size"] == SIZE and got.attrs["kind"] == "features"
    assert (
        got.attrs["preprocess"]["normalization"] == "unit"
        and got.attrs["backbone_config"]["source"] == "test"
    )
    readme = (ROOT / "cache" / "README.md").read_text()
    documented = re.findall(r"^\| `(\w+)` +\| (?:yes|extract|written) ", readme, re.M)
    # Every attribute written is documented, and every documented one is written.
    assert len(documented) == 15 and set(documented) == set(got.attrs)


def test_batches_are_padded_only_under_xla_and_only_to_a_power_of_two(images, tmp_path):
    names, paths = images
    plain = FakeBackbone()
    extract(names, paths, tmp_path / "plain", backbone=plain, batch_size=4)
    # 7 readable images of 12 in shards of 4 rows: each call is its own batch, no padded rows.
    assert all(shape[1:] == (SIZE, SIZE, 1) for shape in plain.calls)  # uint8, one channel
    assert sum(shape[0] for shape in plain.calls) == 7
    compiled = FakeBackbone(config={"name": "fake", "source": "test", "resolved": {"xla": True}})
    extract(names, paths, tmp_path / "xla", backbone=compiled, batch_size=64)
    sizes = [shape[0] for shape in compiled.calls]
    assert set(sizes) <= {1, 2, 4} and sum(sizes) > 7  # short batches padded to a power of two, not to 64
    plain_rows = store.read_features(tmp_path / "plain" / "fake.h5").features
    np.testing.assert_array_equal(store.read_features(tmp_path / "xla" / "fake.h5").features, plain_rows)
    assert [extraction.padded_rows(n, most=64) for n in (1, 3, 5, 64, 65)] == [1, 4, 8, 64, 64]


def pixel_backbone(size: int = 10, name: str = "pix") -> FakeBackbone:
    spec = image_loader.ImageSpec(size=size, normalization="bytes", channels=1)
    return FakeBackbone(
        name=name, kind="pixels", spec=spec, dim=size, config={"name": name, "source": "pixels"}
    )


def assert_same_files(cache_a: Path, cache_b: Path, names=("fake", "second")):
    for name in names:
        assert_same_file(store.cache_path(cache_a, name), store.cache_path(cache_b, name))


CHILD = """
import json, sys
from tests.fixtures import FakeBackbone, extract, second_backbone
job = json.load(open(sys.argv[1]))
backbones = [FakeBackbone(delay=0.4), second_backbone()]
extract(job["names"], job["paths"], job["cache"], backbones=backbones, shard_size=2)
"""


def test_kill_mid_pass_then_resume_gives_identical_files(images, tmp_path):
    names, paths = images
    reference = [
        extract(names, paths, tmp_path / "reference", backbone=b, shard_size=2)
        for b in (FakeBackbone(), second_backbone())
    ]
    job = {"names": names, "paths": paths, "cache": str(tmp_path / "killed")}
    # No chance to clean up: the worst case.
    kill_mid_pass(
        CHILD, job, shards=store.shard_dir(tmp_path / "killed", "fake"), job_path=tmp_path / "job.json"
    )
    finished = {
        b: len(list(store.shard_dir(tmp_path / "killed", b).glob("*.h5"))) for b in ("fake", "second")
    }
    assert 2 <= finished["fake"] < 6 and finished["second"] < 6, "the child should die mid-pass"
    assert not store.cache_path(tmp_path / "killed", "fake").exists()
    resumed = extract(
        names, paths, tmp_path / "killed", backbones=[FakeBackbone(), second_backbone()], shard_size=2
    )
    for summary, ref in zip(resumed, reference, strict=True):
        assert (summary.shards_skipped, summary.shards_done) == (
            finished[ref.backbone],
            6 - finished[ref.backbone],
        )
        assert (summary.done, summary.failed) == (ref.done, ref.failed)
    assert_same_files(tmp_path / "killed", tmp_path / "reference")


@pytest.mark.parametrize("views", [1, 2])
def test_one_pass_over_several_backbones_writes_the_files_of_separate_runs(images, tmp_path, views):
    names, paths = images
    separate = [
        extract(names, paths, tmp_path / "separate", backbone=b, views=views, seed=3)
        for b in (FakeBackbone(), second_backbone(), pixel_backbone())
    ]
    fake, second = FakeBackbone(), second_backbone()
    together = extract(
        names, paths, tmp_path / "together", backbones=[fake, second, pixel_backbone()], views=views, seed=3
    )
    assert [s.backbone for s in together] == ["fake", "second", "pix"]
    assert_same_files(tmp_path / "together", tmp_path / "separate", names=("fake", "second", "pix"))
    for one, other in zip(together, separate, strict=True):
        assert (one.done, one.failed, one.failures) == (other.done, other.failed, other.failures)
        status = store.read_features(one.path).status
        assert {
            row: Status(status[row]) for row in np.flatnonzero(status)
        } == EXPECTED_STATUS  # failed for all
    # Each backbone saw every batch at its own size: decoded once, resized per backbone.
    assert [c[0] for c in fake.calls] == [c[0] for c in second.calls]
    assert {c[1:] for c in fake.calls} == {(SIZE, SIZE, 1)} and {c[1:] for c in second.calls} == {(6, 6, 1)}
    assert sum(c[0] for c in fake.calls) == 7 * views  # each readable image's views, no padded rows


def test_one_pass_with_shard_workers_gives_the_files_of_one_worker(images, tmp_path):
    names, paths = images
    extract(names, paths, tmp_path / "one", backbones=[FakeBackbone(), second_backbone()], shard_size=2)
    for k in (1, 0):
        last = extract(
            names,
            paths,
            tmp_path / "two",
            backbones=[FakeBackbone(), second_backbone()],
            shard_size=2,
            shard=(k, 2),
        )
    assert [s.shards_done for s in last] == [3, 3] and all(s.path is not None for s in last)
    assert_same_files(tmp_path / "two", tmp_path / "one")


def test_one_pass_only_runs_what_each_backbone_still_needs(images, tmp_path):
    names, paths = images
    extract(names, paths, tmp_path / "reference", backbones=[FakeBackbone(), second_backbone()])
    extract(names, paths, tmp_path / "cache", backbone=FakeBackbone())  # fake finished and merged
    extract(names, paths, tmp_path / "cache", backbone=second_backbone(), shard=(1, 3))  # one shard of three
    fake, second = FakeBackbone(), second_backbone()
    first, other = extract(names, paths, tmp_path / "cache", backbones=[fake, second])
    assert fake.calls == [] and (first.shards_done, first.shards_skipped) == (0, 3)
    assert (other.shards_done, other.shards_skipped) == (2, 1)
    assert len(second.calls) == 3  # rows 0-4 and 8-12 only: 3 + 2 images that decode, in batches of 2
    assert_same_files(tmp_path / "cache", tmp_path / "reference")


def test_a_recipe_clash_in_any_backbone_stops_the_pass_before_any_work(images, tmp_path):
    names, paths = images
    extract(names, paths, tmp_path / "cache", backbone=second_backbone())
    changed = second_backbone(config={"name": "second", "source": "test", "seed": 1})
    with pytest.raises(InputError, match=r"second.h5 was made differently.*\(backbone_config.seed\)"):
        extract(names, paths, tmp_path / "cache", backbones=[FakeBackbone(), changed])
    assert not store.shard_dir(tmp_path / "cache", "fake").exists()
    with pytest.raises(InputError, match="name each backbone once"):
        extract(names, paths, tmp_path / "cache", backbones=[FakeBackbone(), FakeBackbone()])


def test_two_shard_workers_give_the_same_file_as_one(images, tmp_path):
    names, paths = images
    one = extract(names, paths, tmp_path / "one", shard_size=2)
    first = extract(names, paths, tmp_path / "two", shard_size=2, shard=(0, 2))
    assert first.path is None and (first.shards_done, first.shards_skipped) == (3, 0)
    assert sorted(p.name for p in store.shard_dir(tmp_path / "two", "fake").glob("*.h5"))[:2] == [
        "000000000-000000002.h5",
        "000000004-000000006.h5",
    ]
    second = extract(names, paths, tmp_path / "two", shard_size=2, shard=(1, 2))
    assert second.path == tmp_path / "two" / "fake.h5" and second.shards_done == 3
    assert_same_file(second.path, one.path)
    assert (first.done + second.done, first.failed + second.failed) == (one.done, one.failed)


def test_a_rerun_reuses_the_finished_file_without_running_the_backbone(images, tmp_path):
    names, paths = images
    first = extract(names, paths, tmp_path / "cache")
    backbone = FakeBackbone()
    again = extract(names, paths, tmp_path / "cache", backbone=backbone)
    assert backbone.calls == [] and again.path == first.path
    assert (again.done, again.failed, again.shards_done, again.shards_skipped) == (7, 5, 0, 3)


def test_a_rerun_after_a_crash_before_merge_only_merges(images, tmp_path):
    names, paths = images
    first = extract(names, paths, tmp_path / "cache")
    reference = tmp_path / "reference.h5"
    first.path.rename(reference)
    backbone = FakeBackbone()
    again = extract(names, paths, tmp_path / "cache", backbone=backbone)
    assert backbone.calls == [] and again.shards_skipped == 3
    assert_same_file(again.path, reference)


def test_merge_by_hand_rebuilds_the_file(images, tmp_path):
    names, paths = images
    summary = extract(names, paths, tmp_path / "cache")
    reference = tmp_path / "reference.h5"
    summary.path.rename(reference)
    merged = extraction.merge(cache_dir=tmp_path / "cache", backbone_name="fake")
    assert merged == summary.path
    assert_same_file(merged, reference)
    with pytest.raises(InputError, match="no finished shards"):
        extraction.merge(cache_dir=tmp_path / "cache", backbone_name="other")


@pytest.mark.parametrize(
    "change, differs",
    [
        (dict(dtype="float32"), "dtype: float16 stored, float32 now"),
        (dict(shard_size=3), "shard_size: 4 stored, 3 now"),
        (
            dict(backbone=FakeBackbone(config={"name": "fake", "source": "test", "seed": 1})),
            "backbone_config.seed",
        ),
        (
            dict(backbone=FakeBackbone(spec=image_loader.ImageSpec(size=SIZE, normalization="standardize"))),
            "preprocess.normalization",
        ),
        (dict(limit=10), "image_list_sha256"),
        # More views also record their seed in preprocess: the refusal names the views alone.
        (dict(views=3), "views: 1 stored, 3 now"),
    ],
    ids=["dtype", "shard_size", "backbone_config", "preprocess", "image_list", "views"],
)
def test_another_recipe_is_refused_until_forced(images, tmp_path, change, differs):
    names, paths = images
    change = dict(change)
    limit = change.pop("limit", len(names))
    extract(names, paths, tmp_path / "cache")
    with pytest.raises(
        InputError, match=rf"fake.h5 was made differently from this run \({differs}\); start over$"
    ) as err:
        extract(names[:limit], paths[:limit], tmp_path / "cache", **change)
    assert err.value.fix == Fix("extract", {"backbone": "fake", "force": True})
    forced = extract(names[:limit], paths[:limit], tmp_path / "cache", force=True, **change)
    assert forced.shards_done == len(store.shard_ranges(limit, change.get("shard_size", 4)))
    got = store.read_features(forced.path)
    assert len(got.names) == limit and got.attrs["dtype"] == change.get("dtype", "float16")


def test_shards_of_another_recipe_are_refused(images, tmp_path):
    names, paths = images
    extract(names, paths, tmp_path / "cache", shard=(0, 2))
    with pytest.raises(
        InputError,
        match=r"000000000-000000004.h5 was made differently from this run \(dtype: float16 stored, float32 now\)",
    ) as err:
        extract(names, paths, tmp_path / "cache", shard=(1, 2), dtype="float32")
    assert err.value.fix == Fix("extract", {"backbone": "fake", "force": True})
    forced = extract(names, paths, tmp_path / "cache", shard=(1, 2), dtype="float32", force=True)
    assert forced.path is None  # shard 0/2 must be redone under the new recipe
    left = sorted(p.name for p in store.shard_dir(tmp_path / "cache", "fake").glob("*.h5"))
    assert left == ["000000004-000000008.h5"]


def test_views_store_the_plain_image_first_then_seeded_augmentations(images, tmp_path):
    names, paths = images
    plain = store.read_features(extract(names, paths, tmp_path / "plain").path)
    views = store.read_features(extract(names, paths, tmp_path / "views", views=3, seed=5).path)
    again = store.read_features(extract(names, paths, tmp_path / "again", views=3, seed=5).path)
    other = store.read_features(extract(names, paths, tmp_path / "other", views=3, seed=6).path)
    ok = plain.status == Status.OK
    assert views.features.shape == (12, 3, 12) and views.attrs["views"] == 3
    np.testing.assert_array_equal(views.features[:, 0], plain.features)
    assert not np.array_equal(views.features[ok, 1], views.features[ok, 0])
    assert views.features.tobytes() == again.features.tobytes()
    assert not np.array_equal(views.features[ok, 1:], other.features[ok, 1:])
    assert views.attrs["preprocess"]["augment_seed"] == 5 and "augment_seed" not in plain.attrs["preprocess"]


def test_pixels_are_stored_as_uint8_images(images, tmp_path):
    names, paths = images
    spec = image_loader.ImageSpec(size=SIZE, normalization="bytes", channels=1)
    backbone = FakeBackbone(name="pix", kind="pixels", spec=spec, dim=SIZE)
    got = store.read_features(
        extract(names, paths, tmp_path / "cache", backbone=backbone, dtype="float32").path
    )
    assert got.features.dtype == np.uint8 and got.features.shape == (12, SIZE, SIZE)
    assert got.attrs["dtype"] == "uint8" and got.attrs["kind"] == "pixels"
    expected = image_loader.load_image(paths[0], spec)[..., 0]
    np.testing.assert_array_equal(got.features[0], expected)


def test_float32_on_request(images, tmp_path):
    names, paths = images
    got = store.read_features(extract(names, paths, tmp_path / "cache", dtype="float32").path)
    assert got.features.dtype == np.float32
    expected = FakeBackbone().fn(image_loader.load_image(paths[0], FakeBackbone().spec)[None]).numpy()[0]
    np.testing.assert_array_equal(got.features[0], expected)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(shard=(2, 2)), "shard 2/2"),
        (dict(shard=(0, 0)), "shard 0/0"),
    ],
)
def test_bad_options_are_refused(images, tmp_path, options, message):
    names, paths = images
    with pytest.raises(InputError, match=message):
        extract(names, paths, tmp_path / "cache", **options)


def test_misaligned_or_empty_input_is_refused(images, tmp_path):
    names, paths = images
    with pytest.raises(InputError, match="12 image names but 11 images"):
        extract(names, paths[:11], tmp_path / "cache")
    with pytest.raises(InputError, match="no images"):
        extract([], [], tmp_path / "cache")


BROKEN = {
    "empty": Status.EMPTY,
    "truncated": Status.TRUNCATED,
    "not_png": Status.UNDECODABLE,
    "corrupt": Status.UNDECODABLE,
}


def test_real_random_and_pixels_backbones_on_a_sample_data_set(tmp_path):
    from dataset.index import find_csv, find_images, read_index
    from dataset.sample import make_sample
    from extract.backbones import load_backbone
    from extract.settings import BackboneConfig

    made = make_sample(tmp_path / "data", images=16, size=32, broken=4)
    index = read_index(find_csv(tmp_path / "data"), label_names=("Cardiomegaly", "Effusion"))
    paths = find_images(tmp_path / "data", index.names)
    random = load_backbone(
        BackboneConfig(name="rand", source="random", image_size=16, preprocess="unit", width=4, grid=2)
    )
    pixels = load_backbone(BackboneConfig(name="pix", source="pixels", image_size=16, preprocess="bytes"))
    summaries = extract(
        list(index.names), list(paths), tmp_path / "cache", backbones=[random, pixels], batch_size=4
    )
    for backbone, summary in zip((random, pixels), summaries, strict=True):
        got = store.read_features(summary.path)
        failed = {name: Status(status) for name, status in zip(got.names, got.status, strict=True) if status}
        assert failed == {name: BROKEN[kind] for name, kind in made["broken"].items()} and summary.done == 12
        assert got.features.shape[1:] == ((16,) if backbone is random else (16, 16))
        for row in np.flatnonzero(got.status == Status.OK):  # the sample always has an RGBA and a 16-bit file
            expected = backbone.fn(image_loader.load_image(paths[row], backbone.spec)[None]).numpy()[0]
            np.testing.assert_allclose(
                got.features[row], expected.astype(got.features.dtype), rtol=2e-3, atol=2e-3
            )
        assert got.attrs["backbone_config"]["source"] == backbone.config["source"]


# --- bad input and faults: a recorded failure or a one-line error, and nothing finished is lost --------


def test_an_unreadable_image_is_a_failed_row_and_the_rest_is_extracted(images, tmp_path, monkeypatch):
    import builtins

    names, paths = images
    denied = paths[1]

    def deny(name, *args, **kwargs):  # tests run as root, so chmod cannot make a file unreadable
        if str(name) == denied:
            raise PermissionError(13, "Permission denied", str(name))
        return builtins.open(name, *args, **kwargs)

    monkeypatch.setattr(image_loader, "open", deny, raising=False)
    summary = extract(names, paths, tmp_path / "cache")
    got = store.read_features(summary.path)
    assert got.status[1] == Status.UNDECODABLE and "Permission denied" in got.errors[1]
    assert (summary.done, summary.failed) == (6, 6)  # the 7 readable images less this one


def test_a_full_disk_stops_with_one_line_and_the_rerun_resumes(images, tmp_path, monkeypatch):
    import h5py

    names, paths = images
    reference = extract(names, paths, tmp_path / "reference")
    real, written = h5py.Group.create_dataset, []

    def create_dataset(self, *args, **kwargs):  # the disk fills up during the second shard
        written.append(1)
        if len(written) > 4:
            raise OSError(28, "Can't synchronously write data (error message = 'No space left on device')")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    with pytest.raises(InputError) as err:
        extract(names, paths, tmp_path / "cache")
    assert str(err.value).startswith("no space left on device: ") and "\n" not in str(err.value)
    shards = store.shard_dir(tmp_path / "cache", "fake")
    assert [p.name for p in shards.iterdir()] == ["000000000-000000004.h5"]  # no temporary file left
    monkeypatch.undo()
    resumed = extract(names, paths, tmp_path / "cache")
    assert (resumed.shards_skipped, resumed.shards_done) == (1, 2)
    assert_same_file(resumed.path, reference.path)


def test_images_above_the_pixel_limit_are_failed_rows(images, tmp_path):
    names, paths = images
    big = Path(paths[0])
    write_png(big, np.zeros((40, 30, 1), np.uint8))  # 1,200 pixels; the others have 144
    summary = extract(names, paths, tmp_path / "cache", max_pixels=1000)
    got = store.read_features(summary.path)
    assert got.status[0] == Status.UNDECODABLE
    assert "30x40 pixels is more than the limit of 1,000" in got.errors[0]
    assert (got.status[[2, 4, 6]] == Status.OK).all()


def test_force_removes_a_killed_merges_temporary_file(images, tmp_path):
    from cxr14.temps import temp_path

    names, paths = images
    first = extract(names, paths, tmp_path / "cache")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a writer that is gone
    leftover = first.path.with_name(
        temp_path(first.path).name.replace(f".{os.getpid()}.tmp", f".{child.pid}.tmp")
    )
    leftover.write_bytes(b"x" * 1000)  # 460 MB on the full data set
    extract(names, paths, tmp_path / "cache", force=True)
    assert not leftover.exists()


def test_a_pixel_cache_at_the_images_own_size_gives_the_png_features(images, tmp_path):
    names, paths = images
    pixels = extract(names, paths, tmp_path / "cache", backbone=pixel_backbone(size=12))  # the PNGs are 12 px
    stored = PixelInput.open(pixels.path, names=names)
    from_pixels = extract(
        names, paths, tmp_path / "cache", backbones=[FakeBackbone(), second_backbone()], images=stored
    )
    from_png = extract(names, paths, tmp_path / "png", backbones=[FakeBackbone(), second_backbone()])
    for a, b in zip(from_pixels, from_png, strict=True):
        x, y = store.read_features(a.path), store.read_features(b.path)
        assert x.features.tobytes() == y.features.tobytes()  # one resampling either way
        assert (
            list(x.errors) == list(y.errors) and (x.status == y.status).all()
        )  # reasons copied from the cache
        assert x.attrs["preprocess"]["input"] == {
            "source": "pixels",
            "cache": "pix",
            "image_size": 12,
            "fingerprint": store.read_attrs(pixels.path)["fingerprint"],
        }
        assert y.attrs["preprocess"]["input"]["source"] == "png"
        assert x.attrs["fingerprint"] != y.attrs["fingerprint"]


def test_features_from_a_smaller_pixel_cache_are_close_and_recorded_as_such(images, tmp_path):
    names, paths = images
    pixels = extract(names, paths, tmp_path / "cache", backbone=pixel_backbone(size=10, name="pix10"))
    stored = PixelInput.open(pixels.path, names=names)
    from_pixels = store.read_features(extract(names, paths, tmp_path / "cache", images=stored).path)
    from_png = store.read_features(extract(names, paths, tmp_path / "png").path)
    ok = from_png.status == Status.OK
    gap = np.abs(from_pixels.features[ok].astype(np.float32) - from_png.features[ok].astype(np.float32))
    assert 0 < gap.max() < 0.05  # resampled twice (12 -> 10 -> 8 px) instead of once: close, not equal
    with pytest.raises(InputError, match=r"fake.h5 was made differently from this run \(preprocess.input\)"):
        extract(names, paths, tmp_path / "cache")  # the PNG recipe is another recipe


def test_a_pixel_cache_that_cannot_feed_the_backbones_is_refused(images, tmp_path):
    names, paths = images
    cache = tmp_path / "cache"
    small = extract(names, paths, cache, backbone=pixel_backbone(size=6, name="pix6"))
    with pytest.raises(InputError, match=r"stores 6 px images, smaller than the 8 px backbone 'fake'"):
        extract(names, paths, cache, images=PixelInput.open(small.path, names=names))
    with pytest.raises(InputError, match="cannot also be written"):
        extract(
            names,
            paths,
            cache,
            backbones=[pixel_backbone(size=6, name="pix6")],
            images=PixelInput.open(small.path, names=names),
        )
    features = extract(names, paths, cache)
    with pytest.raises(InputError, match="kind='features'.*needs a one-view cache"):
        PixelInput.open(features.path, names=names)
    with pytest.raises(InputError, match=r"no pixel cache; make it first"):
        PixelInput.open(cache / "absent.h5", names=names)


def test_images_missing_from_the_pixel_cache_are_recorded(images, tmp_path):
    names, paths = images
    part = extract(names[:8], paths[:8], tmp_path / "cache", backbone=pixel_backbone(size=12))
    got = store.read_features(
        extract(names, paths, tmp_path / "cache", images=PixelInput.open(part.path, names=names)).path
    )
    assert (got.status[8:] == Status.MISSING).all() and "not in pixel cache" in got.errors[9]
    assert got.status[7] == Status.TRUNCATED and "IEND" in got.errors[7]  # the cache's own record
    assert (got.status[[0, 1, 2, 4, 6]] == Status.OK).all()


def test_a_rerun_on_another_data_set_reusing_the_names_is_refused(images, tmp_path):
    """Same image names, other labels (a make-sample set of another seed): its shards are not resumed."""
    names, paths = images
    extract(names, paths, tmp_path / "cache", shard=(0, 2), dataset=dataset_of(names))
    with pytest.raises(InputError, match=r"made differently from this run \(dataset.labels\)") as err:
        extract(names, paths, tmp_path / "cache", shard=(1, 2), dataset=dataset_of(names, seed=1))
    assert err.value.fix == Fix("extract", {"backbone": "fake", "force": True})


def test_a_pixel_cache_of_another_data_set_or_with_shifted_rows_is_refused(images, tmp_path):
    names, paths = images
    pixels = extract(
        names, paths, tmp_path / "cache", backbone=pixel_backbone(size=12), dataset=dataset_of(names)
    )
    assert PixelInput.open(pixels.path, names=names, index=index_of(names)).size == 12
    with pytest.raises(InputError, match=r"pix.h5 was extracted from another data set than data1/Data_Entry"):
        PixelInput.open(pixels.path, names=names, index=index_of(names, seed=1))
    with h5py.File(pixels.path, "a") as f:
        f["features"][...] = np.roll(f["features"][()], 1, axis=0)
    with pytest.raises(InputError, match="pix.h5: its features do not match the checksums"):
        PixelInput.open(pixels.path, names=names, index=index_of(names))
