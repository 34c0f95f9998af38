"""The image pipeline against independent numpy/PIL references, on tiny PNGs written by the tests."""

import numpy as np
import pytest
import tensorflow as tf

from cache.status import Status
from cxr14.errors import InputError
from dataset.image_loader import (
    ImageError,
    ImageSpec,
    PngFiles,
    augment,
    check_file,
    decode,
    decode_error,
    load_image,
    make_dataset,
    normalize,
)

SIZE = 64  # source images; resized to 16 (factor 4) so the reference is a plain block mean


def _gray(seed=0, size=SIZE) -> np.ndarray:
    """A uint8 image with structure (gradient + blob + noise) so block means differ."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = 120 * x + 60 * np.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) / 0.02) + rng.normal(0, 20, (size, size))
    return np.clip(image + 40, 0, 255).astype(np.uint8)


def _write_png(path, array: np.ndarray):
    array = array if array.ndim == 3 else array[..., None]
    path.write_bytes(tf.io.encode_png(tf.constant(array)).numpy())
    return path


def _block_mean(gray01: np.ndarray, out: int) -> np.ndarray:
    k = gray01.shape[0] // out
    return gray01.reshape(out, k, out, k).mean(axis=(1, 3))


def _as_bytes(gray01: np.ndarray) -> np.ndarray:
    """What the host sends the device: [0,1] rounded to uint8."""
    return np.rint(np.clip(gray01 * 255, 0, 255)).astype(np.uint8)


@pytest.fixture
def gray_png(tmp_path):
    return _write_png(tmp_path / "gray.png", _gray())


@pytest.fixture
def broken_files(tmp_path):
    good = _write_png(tmp_path / "good.png", _gray(1)).read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    # Valid signature and IEND, broken image data: only decoding can tell.
    corrupt = bytearray(good)
    corrupt[40:80] = b"\x00" * 40
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    return tmp_path


# --- normalisation vs references ------------------------------------------------------------------

REF_MEANS_CAFFE_BGR = np.array([103.939, 116.779, 123.68])
TORCH_MEAN = np.array([0.485, 0.456, 0.406])
TORCH_STD = np.array([0.229, 0.224, 0.225])


def _reference(gray01_small: np.ndarray, normalization: str, family: str) -> np.ndarray:
    g = gray01_small[..., None]
    if normalization == "unit":
        return np.repeat(g, 3, axis=-1)
    if normalization == "bytes":
        return np.repeat(g * 255, 3, axis=-1)
    if normalization == "standardize":
        std = max(g.std(), 1 / np.sqrt(g.size))
        return np.repeat((g - g.mean()) / std, 3, axis=-1)
    rgb = np.repeat(g * 255, 3, axis=-1)
    if family == "resnet":  # caffe: RGB -> BGR, ImageNet mean subtracted, no scaling
        return rgb[..., ::-1] - REF_MEANS_CAFFE_BGR
    if family == "resnet_v2":  # tf: [-1, 1]
        return rgb / 127.5 - 1
    if family == "densenet":  # torch: [0, 1], ImageNet mean/std
        return (rgb / 255 - TORCH_MEAN) / TORCH_STD
    if family == "efficientnet":  # normalises inside the model: 0..255 passes through
        return rgb
    raise AssertionError(family)


@pytest.mark.parametrize(
    ("normalization", "family"),
    [
        ("unit", ""),
        ("bytes", ""),
        ("standardize", ""),
        ("keras", "resnet"),
        ("keras", "resnet_v2"),
        ("keras", "densenet"),
        ("keras", "efficientnet"),
    ],
)
def test_normalization_matches_reference(gray_png, normalization, family):
    spec = ImageSpec(size=16, normalization=normalization, keras_family=family)
    got = load_image(gray_png, spec)
    assert got.shape == (16, 16, 1) and got.dtype == np.uint8
    # float32 area means vs float64 block means: a value near .5 may round the other way.
    np.testing.assert_allclose(got[..., 0], _as_bytes(_block_mean(_gray() / 255.0, 16)), atol=1)
    normalized = normalize(got, spec).numpy()  # what the backbone does on its device
    assert normalized.shape == (16, 16, 3) and normalized.dtype == np.float32
    expected = _reference(got[..., 0] / 255.0, normalization, family)
    np.testing.assert_allclose(normalized, expected, atol=1e-4, rtol=1e-5)
    batch = normalize(np.stack([got, 255 - got]), spec).numpy()  # batches normalise image by image
    np.testing.assert_allclose(batch[0], normalized, atol=1e-6)


def test_one_channel_spec(gray_png):
    spec = ImageSpec(size=16, normalization="bytes", channels=1)
    got = normalize(load_image(gray_png, spec), spec).numpy()
    assert got.shape == (16, 16, 1)
    np.testing.assert_allclose(got[..., 0], _block_mean(_gray().astype(np.float64), 16), atol=0.5)


def test_upscaling_keeps_range(gray_png):
    got = load_image(gray_png, ImageSpec(size=100, normalization="unit"))
    assert got.shape == (100, 100, 1)
    np.testing.assert_allclose(got.mean() / 255, _gray().mean() / 255, atol=0.01)


def test_bad_spec_is_input_error():
    with pytest.raises(InputError, match="normalization = 'zscore' is not one of"):
        ImageSpec(size=16, normalization="zscore")
    with pytest.raises(InputError, match="keras_family 'resnet_v9'.*resnet_v2"):
        ImageSpec(size=16, normalization="keras", keras_family="resnet_v9")
    with pytest.raises(InputError, match="channels must be 1 or 3, got 2"):
        ImageSpec(size=16, normalization="unit", channels=2)
    with pytest.raises(InputError, match="image size must be positive, got 0"):
        ImageSpec(size=0, normalization="unit")


# --- decoding --------------------------------------------------------------------------------------


def test_png_variants_decode_to_same_gray(tmp_path):
    gray = _gray()
    variants = {
        "L8": gray,
        "L16": gray.astype(np.uint16) * 257,
        "LA": np.dstack([gray, np.full_like(gray, 255)]),
        "RGB": np.dstack([gray] * 3),
        "RGBA": np.dstack([gray] * 3 + [np.full_like(gray, 255)]),
        "RGBA16": np.dstack([gray.astype(np.uint16) * 257] * 3 + [np.full(gray.shape, 65535, np.uint16)]),
    }
    for name, array in variants.items():
        decoded = decode(tf.io.read_file(str(_write_png(tmp_path / f"{name}.png", array)))).numpy()
        assert decoded.shape == (SIZE, SIZE, 1), name
        np.testing.assert_allclose(decoded[..., 0], gray / 255.0, atol=1e-6, err_msg=name)


def test_palette_png_decodes_to_same_gray(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    gray = _gray()
    path = tmp_path / "palette.png"
    image_module.fromarray(gray).convert("P").save(path)
    with image_module.open(path) as image:
        assert image.mode == "P"
    decoded = decode(tf.io.read_file(str(path))).numpy()[..., 0]
    np.testing.assert_allclose(decoded, gray / 255.0, atol=1e-6)


def test_sixteen_bit_keeps_full_precision(tmp_path):
    values = np.random.default_rng(3).integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
    decoded = decode(tf.io.read_file(str(_write_png(tmp_path / "deep.png", values)))).numpy()[..., 0]
    np.testing.assert_allclose(decoded, values / 65535.0, atol=1e-6)
    assert len(np.unique(np.round(decoded * 255))) < len(np.unique(decoded))  # more than 8 bits survive


# --- broken files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        ("nowhere.png", Status.MISSING, "not found"),
        ("empty.png", Status.EMPTY, "empty"),
        ("truncated.png", Status.TRUNCATED, "IEND"),
        ("garbage.png", Status.UNDECODABLE, "not a PNG"),
    ],
)
def test_check_file_classifies(broken_files, name, status, message):
    got_status, reason = check_file(broken_files / name)
    assert got_status == status
    assert message in reason and name in reason
    assert decode_error(broken_files / name) == reason
    with pytest.raises(ImageError) as err:
        load_image(broken_files / name, ImageSpec(size=16, normalization="unit"))
    assert err.value.status == status


def test_corrupt_data_found_only_by_decoding(broken_files):
    path = broken_files / "corrupt.png"
    assert check_file(path) == (Status.OK, "")
    reason = decode_error(path)
    assert "corrupt.png: PNG cannot be decoded" in reason and "{{" not in reason
    with pytest.raises(ImageError) as err:
        load_image(path, ImageSpec(size=16, normalization="unit"))
    assert err.value.status == Status.UNDECODABLE


def test_good_file_checks_ok(broken_files):
    assert check_file(broken_files / "good.png") == (Status.OK, "")
    assert decode_error(broken_files / "good.png") == ""
    assert check_file("")[0] == Status.MISSING


# --- make_dataset ----------------------------------------------------------------------------------


def _mixed_paths(tmp_path, broken_files, n=12):
    paths = [str(_write_png(tmp_path / f"img{i:02d}.png", _gray(10 + i))) for i in range(n)]
    bad = {2: "empty.png", 5: "truncated.png", 6: "garbage.png", 9: "corrupt.png", 10: "nowhere.png"}
    for i, name in bad.items():
        paths[i] = str(broken_files / name)
    return paths, sorted(bad)


def test_make_dataset_drops_bad_and_keeps_rows_in_step(tmp_path, broken_files):
    paths, bad = _mixed_paths(tmp_path, broken_files)
    rows = np.arange(len(paths)) + 1000
    spec = ImageSpec(size=16, normalization="standardize")
    shards = [(0, 4), (4, 8), (8, 12)]
    dataset = make_dataset(PngFiles(paths=paths, rows=rows), sizes=[16], batch_size=3, shards=shards)
    batches = [(r.numpy(), x.numpy()) for r, (x,) in dataset]
    got_rows = np.concatenate([r for r, _ in batches])
    assert got_rows.dtype == np.int64
    np.testing.assert_array_equal(got_rows, [1000 + i for i in range(12) if i not in bad])
    for r, x in batches:
        assert len({(row - 1000) // 4 for row in r}) == 1  # never crosses a shard
        assert x.shape == (len(r), 16, 16, 1) and x.dtype == np.uint8
        for row, image in zip(r, x, strict=True):  # same pixels as the eager single-image path
            np.testing.assert_array_equal(image, load_image(paths[row - 1000], spec))
    assert [len(r) for r, _ in batches] == [3, 2, 2]  # 4-1, 4-2, 4-2 good images per shard


def test_one_decode_feeds_every_size(tmp_path):
    paths = [str(_write_png(tmp_path / f"s{i}.png", _gray(i))) for i in range(5)]
    dataset = make_dataset(
        PngFiles(paths=paths, rows=np.arange(5)), sizes=[8, 16, 20], batch_size=2, shards=[(0, 5)]
    )
    for rows, pixels in dataset:
        assert [p.shape[1] for p in pixels] == [8, 16, 20]
        for size, batch in zip([8, 16, 20], pixels, strict=True):
            for row, image in zip(rows.numpy(), batch.numpy(), strict=True):
                expected = load_image(paths[row], ImageSpec(size=size, normalization="unit"))
                np.testing.assert_array_equal(image, expected)


def test_make_dataset_takes_shards_in_given_order(tmp_path, broken_files):
    paths, _ = _mixed_paths(tmp_path, broken_files)
    source = PngFiles(paths=paths, rows=np.arange(12))
    ds = make_dataset(source, sizes=[16], batch_size=8, shards=[(8, 12), (0, 2)])
    assert np.concatenate([r.numpy() for r, _ in ds]).tolist() == [8, 11, 0, 1]
    one_worker = make_dataset(source, sizes=[16], batch_size=8, shards=[(8, 12), (0, 2)], workers=1)
    assert np.concatenate([r.numpy() for r, _ in one_worker]).tolist() == [8, 11, 0, 1]
    with pytest.raises(ValueError, match="outside"):
        make_dataset(source, sizes=[16], batch_size=8, shards=[(0, 13)])


def test_views_are_seeded_and_view_zero_is_plain(tmp_path):
    paths = [str(_write_png(tmp_path / f"v{i}.png", _gray(i))) for i in range(4)]
    spec = ImageSpec(size=32, normalization="unit", channels=1)
    source = PngFiles(paths=paths, rows=np.arange(4))

    def run(seed):
        ds = make_dataset(source, sizes=[32], batch_size=4, shards=[(0, 4)], views=3, seed=seed)
        return np.concatenate([x.numpy() for _, (x,) in ds]).astype(np.float32) / 255

    first, again, other = run(0), run(0), run(1)
    assert first.shape == (4, 3, 32, 32, 1)
    np.testing.assert_array_equal(first, again)
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(first[i, 0], load_image(path, spec) / np.float32(255))
    assert not np.allclose(first[:, 1:], other[:, 1:])
    np.testing.assert_array_equal(first[:, 0], other[:, 0])
    assert np.abs(first[:, 1] - first[:, 2]).mean() > 0.01  # the views differ from each other


def test_augment_deterministic_and_in_range():
    image = tf.constant(_gray(5, size=32)[..., None] / 255.0, tf.float32)
    seed = tf.constant([7, 3], tf.int64)
    a = augment(image, seed=seed).numpy()
    np.testing.assert_array_equal(a, augment(image, seed=seed).numpy())
    b = augment(image, seed=tf.constant([7, 4], tf.int64)).numpy()
    assert a.shape == (32, 32, 1) and not np.allclose(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - image.numpy()).mean() > 0.01


# --- what check_file says, and what it refuses --------------------------------------------------------


def _unreadable(monkeypatch, path):
    """Opening `path` fails as for a file without read permission (tests run as root, so chmod cannot)."""
    import builtins

    from dataset import image_loader

    def deny(name, *args, **kwargs):
        if str(name) == str(path):
            raise PermissionError(13, "Permission denied", str(name))
        return builtins.open(name, *args, **kwargs)

    monkeypatch.setattr(image_loader, "open", deny, raising=False)


def test_an_unreadable_file_is_a_failure_with_its_reason(broken_files, monkeypatch):
    path = broken_files / "good.png"
    _unreadable(monkeypatch, path)
    assert check_file(path) == (Status.UNDECODABLE, f"{path}: cannot be read (Permission denied)")
    with pytest.raises(ImageError) as err:
        load_image(path, ImageSpec(size=16, normalization="unit"))
    assert err.value.status == Status.UNDECODABLE and "Permission denied" in err.value.reason


def test_a_folder_or_broken_link_says_what_it_is(tmp_path):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    assert check_file(tmp_path / "folder.png") == (
        Status.MISSING,
        f"{tmp_path / 'folder.png'}: a folder, not an image file",
    )
    status, reason = check_file(tmp_path / "link.png")
    assert status == Status.MISSING and "broken symbolic link" in reason and "gone.png" in reason
    status, reason = check_file("")
    assert status == Status.MISSING and "(no path)" not in reason


def test_the_reason_for_a_non_png_does_not_echo_its_bytes(tmp_path):
    path = tmp_path / "evil.png"
    path.write_bytes(b"SECRET\x1b[2J\r\n" + bytes(range(256)))  # a terminal escape, a line break
    status, reason = check_file(path)
    assert status == Status.UNDECODABLE and "not a PNG file" in reason
    assert "SECRET" not in reason and "\\x1b" not in reason and reason.isprintable()


def test_bytes_after_iend_are_accepted_like_decoders_do(tmp_path):
    clean = _write_png(tmp_path / "clean.png", _gray(2))
    padded = tmp_path / "padded.png"
    padded.write_bytes(clean.read_bytes() + b"\x00junk after the image" * 20)
    assert check_file(padded) == (Status.OK, "")
    spec = ImageSpec(size=16, normalization="unit")
    np.testing.assert_array_equal(load_image(padded, spec), load_image(clean, spec))
    cut = tmp_path / "cut.png"  # without IEND it is still a truncated file, however long the chunks run
    cut.write_bytes(clean.read_bytes()[:-12] + b"\x00" * 100)
    assert check_file(cut)[0] == Status.TRUNCATED


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    from dataset import image_loader

    path = _write_png(tmp_path / "big.png", _gray(3))  # 64 x 64 = 4,096 pixels
    assert check_file(path, max_pixels=4096) == (Status.OK, "")
    status, reason = check_file(path, max_pixels=4095)
    assert status == Status.UNDECODABLE and "64x64 pixels is more than the limit of 4,095" in reason

    def no_decoding(*args, **kwargs):
        raise AssertionError("a refused image was decoded")

    monkeypatch.setattr(image_loader, "decode", no_decoding)
    with pytest.raises(ImageError, match="more than the limit"):
        load_image(path, ImageSpec(size=16, normalization="unit"), max_pixels=4095)


def test_a_bomb_header_is_read_without_decoding(tmp_path):
    """A 20000 x 20000 16-bit header: the size comes from IHDR, so nothing is decompressed."""
    png = bytearray(_write_png(tmp_path / "small.png", _gray(4)).read_bytes())
    png[16:24] = (20000).to_bytes(4, "big") * 2
    (tmp_path / "bomb.png").write_bytes(bytes(png))
    status, reason = check_file(tmp_path / "bomb.png", max_pixels=25_000_000)
    assert status == Status.UNDECODABLE and "20000x20000 pixels" in reason
