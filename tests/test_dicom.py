"""DICOM through the one image pipeline (dataset/dicom.py, dataset/image_loader.py): real films from the
pydicom-data package, small synthetic films made here for each rule and each failure."""

import numpy as np
import pydicom
import pytest
import tensorflow as tf
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from cache.status import Status
from dataset.image_loader import ImageError, check_file, decode_error, read_gray01
from dataset.index import find_images
from dataset.sample import make_sample
from dataset.settings import LABELS
from extract.backbones import load_backbone
from extract.extraction import extract_features
from extract.inputs import PngInput
from inference.export import build_module
from inference.predict import list_images, predict_images
from inference.trained import load_run
from tests.fixtures import REAL_CXR, TINY, TINY_STD, make_config, make_run, write_dicom, write_png
from tests.pypi_data import package_files

REAL_FILMS = {"RG1_UNCR.dcm": "data_store/data/RG1_UNCR.dcm", "RG1_J2KR.dcm": "data_store/data/RG1_J2KR.dcm"}


@pytest.fixture(scope="module")
def real_films() -> dict:
    """RG1_UNCR.dcm (CR chest PA, 1955 x 1841, 15-bit, MONOCHROME1) and RG1_J2KR.dcm (the same, JPEG 2000)."""
    return package_files("pydicom-data", "1.0.0", REAL_FILMS)


def ramp(bits: int, *, shape=(40, 48), signed=False) -> np.ndarray:
    """Every value of a `bits`-bit range once or more, as a film."""
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = np.linspace(low, high, int(np.prod(shape))).round().reshape(shape)
    return values.astype(np.int16 if signed else np.uint16 if bits > 8 else np.uint8)


# --- real films ----------------------------------------------------------------------------------------


def test_real_films_both_encodings_predict_alike(real_films, tmp_path):
    uncompressed, jpeg2000 = real_films["RG1_UNCR.dcm"], real_films["RG1_J2KR.dcm"]
    image = read_gray01(uncompressed)
    assert image.shape == (1955, 1841, 1) and image.dtype == np.float32
    assert 0.0 <= image.min() < image.max() <= 1.0
    np.testing.assert_array_equal(read_gray01(jpeg2000), image)  # lossless: the very same pixels

    run_dir = make_run(tmp_path / "runs" / "fc", [TINY_STD])
    pngs = sorted(REAL_CXR.glob("*.png")) if REAL_CXR.is_dir() else []
    results = predict_images(
        run_dir=run_dir, inputs=[uncompressed, jpeg2000, *pngs], extract=make_config(tmp_path).extract
    )
    assert all(r["error"] is None and list(r["probabilities"]) == list(LABELS) for r in results)
    probabilities = np.array([list(r["probabilities"].values()) for r in results])
    gap = np.abs(probabilities[0] - probabilities[1]).max()
    print(f"RG1_UNCR vs RG1_J2KR: largest probability difference {gap:.1e}")
    assert gap <= 1e-5
    if pngs:  # a DICOM film and a PNG film are different images
        assert np.abs(probabilities[0] - probabilities[2]).max() > 1e-4


def test_monochrome1_is_inverted(real_films, tmp_path):
    original = real_films["RG1_UNCR.dcm"]
    relabelled = pydicom.dcmread(original)
    relabelled.PhotometricInterpretation = "MONOCHROME2"  # the same stored pixels, read the other way
    relabelled.save_as(tmp_path / "monochrome2.dcm")
    film = read_gray01(original)[..., 0]
    np.testing.assert_allclose(read_gray01(tmp_path / "monochrome2.dcm")[..., 0], 1.0 - film, atol=1e-6)
    # Inverted, the film looks like one: the spine and mediastinum are brighter than the lungs beside them.
    h, w = film.shape
    rows = slice(int(0.3 * h), int(0.5 * h))
    spine = film[rows, int(0.47 * w) : int(0.53 * w)].mean()
    lungs = (
        film[rows, int(0.2 * w) : int(0.3 * w)].mean() + film[rows, int(0.7 * w) : int(0.8 * w)].mean()
    ) / 2
    assert spine > lungs + 0.15, (spine, lungs)


# --- synthetic films: the display rules ---------------------------------------------------------------


def test_without_a_window_a_dicom_is_the_png_of_the_same_pixels(tmp_path):
    for bits in (8, 16):
        pixels = ramp(bits)
        dicom = read_gray01(write_dicom(tmp_path / f"film{bits}.dcm", pixels))
        png = tmp_path / f"film{bits}.png"
        png.write_bytes(tf.io.encode_png(pixels[..., None]).numpy())
        np.testing.assert_allclose(dicom, read_gray01(png), atol=1e-6)
        np.testing.assert_allclose(dicom[..., 0], pixels / (2**bits - 1), atol=1e-6)


def test_rescale_and_window_by_hand(tmp_path):
    pixels = ramp(12)
    slope, intercept, center, width = 2.0, -1024.0, 1000.0, 2000.0
    attrs = dict(BitsStored=12, HighBit=11, RescaleSlope=slope, RescaleIntercept=intercept)
    path = write_dicom(tmp_path / "w.dcm", pixels, WindowCenter=center, WindowWidth=width, **attrs)
    value = pixels * slope + intercept
    # DICOM PS3.3 C.11.2.1.2.1, the LINEAR window, on values after the modality rescale.
    expected = np.clip((value - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(read_gray01(path)[..., 0], expected, atol=1e-6)
    inverted = write_dicom(
        tmp_path / "m1.dcm",
        pixels,
        WindowCenter=center,
        WindowWidth=width,
        PhotometricInterpretation="MONOCHROME1",
        **attrs,
    )
    np.testing.assert_allclose(read_gray01(inverted)[..., 0], 1 - expected, atol=1e-6)
    # No window: the stored 12-bit range, rescaled, is black to white.
    plain = write_dicom(tmp_path / "plain.dcm", pixels, **attrs)
    np.testing.assert_allclose(read_gray01(plain)[..., 0], pixels / 4095, atol=1e-6)


def test_signed_pixels_and_a_voi_lut(tmp_path):
    signed = ramp(16, signed=True)
    path = write_dicom(tmp_path / "signed.dcm", signed, RescaleSlope=1.0, RescaleIntercept=0.0)
    np.testing.assert_allclose(read_gray01(path)[..., 0], (signed + 32768.0) / 65535, atol=1e-6)

    pixels = ramp(12)
    table = np.sqrt(np.arange(4096) / 4095) * 65535  # a 12-bit in, 16-bit out curve
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "US", table.round().astype(np.uint16).tolist())
    lut = write_dicom(tmp_path / "lut.dcm", pixels, BitsStored=12, HighBit=11, VOILUTSequence=[item])
    expected = table.round()[pixels] / 65535
    np.testing.assert_allclose(read_gray01(lut)[..., 0], expected, atol=1e-6)


# --- synthetic films: what is refused, and why ----------------------------------------------------------


def _multi_frame(path):
    return write_dicom(path, ramp(8, shape=(2, 16, 16)), NumberOfFrames=2)


def _colour(path):
    return write_dicom(path, np.zeros((16, 16, 3), np.uint8), PhotometricInterpretation="RGB")


def _no_image(path):
    ds = pydicom.dcmread(write_dicom(path, ramp(8)))
    del ds.PixelData  # e.g. a structured report or a presentation state
    ds.save_as(path, enforce_file_format=True)
    return path


def _32_bit(path):
    return write_dicom(path, np.zeros((16, 16), np.uint32))


def _damaged_header(path):
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00XX\x04\x00abcd")  # no such VR as XX
    return path


def _cut_short(path):
    data = write_dicom(path, ramp(16)).read_bytes()
    path.write_bytes(data[:300])  # inside the header, as an interrupted copy leaves it
    return path


def _compressed_garbage(path):
    ds = pydicom.dcmread(write_dicom(path, ramp(8)))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a JPEG 2000 codestream"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


BROKEN = {
    "multi-frame": (_multi_frame, "multi-frame (2 frames)"),
    "colour": (_colour, "colour image (RGB)"),
    "no image": (_no_image, "holds no image"),
    "32-bit": (_32_bit, "32-bit pixel data"),
    "damaged header": (_damaged_header, "DICOM header cannot be read"),
    "cut short": (_cut_short, "or a file cut short"),
    "compressed, undecodable": (
        _compressed_garbage,
        "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg",
    ),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_unreadable_dicoms_are_refused_with_a_reason(tmp_path, kind):
    make, expected = BROKEN[kind]
    path = make(tmp_path / "film.dcm")
    with pytest.raises(ImageError) as caught:
        read_gray01(path)
    assert caught.value.status == Status.UNDECODABLE
    assert str(path) in caught.value.reason and expected in caught.value.reason, caught.value.reason
    assert decode_error(path) == caught.value.reason
    # The header tells all but undecodable pixel data, so extraction classifies those up front.
    header_only = kind != "compressed, undecodable"
    assert check_file(path) == ((Status.UNDECODABLE, caught.value.reason) if header_only else (Status.OK, ""))


def test_the_pixel_limit_holds_for_dicoms(tmp_path):
    path = write_dicom(tmp_path / "big.dcm", ramp(8, shape=(40, 48)))
    status, reason = check_file(path, max_pixels=1000)
    assert status == Status.UNDECODABLE and "48x40 pixels is more than the limit of 1,000" in reason
    assert check_file(path, max_pixels=1920) == (Status.OK, "")
    with pytest.raises(ImageError, match="extract.max_pixels"):
        read_gray01(path, max_pixels=1000)


def test_a_dcm_that_is_no_dicom_is_named(tmp_path):
    path = tmp_path / "report.dcm"
    path.write_bytes(b"%PDF-1.4 a scanned report, not a film")
    assert check_file(path)[0] == Status.UNDECODABLE and "nor a DICOM" in check_file(path)[1]


# --- DICOM wherever an image is read --------------------------------------------------------------------


def test_extract_reads_dicom_twins_of_the_csv_names(tmp_path):
    """A folder where some films are DICOMs named like the CSV's PNGs gives the PNGs' features."""
    make_sample(tmp_path / "png", images=16, size=48, seed=0, broken=0)
    make_sample(tmp_path / "dcm", images=16, size=48, seed=0, broken=0)
    names = sorted(p.name for p in (tmp_path / "png" / "images").iterdir())
    images = tmp_path / "dcm" / "images"
    for name in names[::3]:  # every third film becomes a DICOM of the same stem
        pixels = tf.io.decode_png((images / name).read_bytes(), channels=1, dtype=tf.uint16).numpy()[..., 0]
        bits = 16 if pixels.max() > 255 else 8
        write_dicom(
            images / name.replace(".png", ".dcm"), pixels.astype(np.uint16 if bits == 16 else np.uint8)
        )
        (images / name).unlink()
    colour = names[1]
    write_dicom(
        images / colour.replace(".png", ".dcm"),
        np.zeros((8, 8, 3), np.uint8),
        PhotometricInterpretation="RGB",
    )
    (images / colour).unlink()

    paths = find_images(tmp_path / "dcm", names)
    assert [p.endswith(".dcm") for p in paths] == [i % 3 == 0 or i == 1 for i in range(len(names))]
    backbone = load_backbone(TINY)
    stored = {}
    for folder in ("png", "dcm"):
        (stored[folder],) = extract_features(
            backbones=[backbone],
            names=names,
            images=PngInput(find_images(tmp_path / folder, names)),
            cache_dir=tmp_path / folder / "features",
            batch_size=4,
            shard_size=8,
            dtype="float32",
            progress=False,
        )
    from cache.store import read_features

    png = read_features(stored["png"].path)
    dcm = read_features(stored["dcm"].path)
    assert list(dcm.names) == names
    good = np.arange(len(names)) != 1
    np.testing.assert_allclose(dcm.features[good], png.features[good], atol=1e-5)
    assert dcm.status[1] == Status.UNDECODABLE and "colour image" in dcm.errors[1]
    assert (dcm.status[good] == Status.OK).all()


def test_predict_lists_dcm_files_and_export_takes_a_decoded_dicom(tmp_path):
    folder = tmp_path / "films"
    folder.mkdir()
    pixels = (np.random.default_rng(0).random((60, 52)) * 4095).astype(np.uint16)
    film = write_dicom(
        folder / "b.dcm", pixels, BitsStored=12, HighBit=11, WindowCenter=2000, WindowWidth=3000
    )
    png = write_png(folder / "a.png", seed=5)
    (folder / "notes.txt").write_text("not an image")
    assert list_images([folder]) == (
        [png, film],
        [(folder / "notes.txt", "left out: not a .png or .dcm file")],
    )

    run_dir = make_run(tmp_path / "runs" / "fc", [TINY])
    expected = predict_images(run_dir=run_dir, inputs=[film], extract=make_config(tmp_path).extract)[0][
        "probabilities"
    ]
    # The function the export saves as serve_image (test_export checks that saving keeps it exact).
    module = build_module(load_run(run_dir))
    got = module.predict_image(tf.constant(read_gray01(film)[None]))["probabilities"].numpy()[0]
    np.testing.assert_allclose(got, list(expected.values()), atol=1e-5)
