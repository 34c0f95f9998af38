"""Config parsing: the shipped config loads; unknown keys and wrong types name the key and the file."""

from pathlib import Path

import pytest

from cxr14.errors import InputError
from cxr14.settings import override
from dataset.settings import LABELS
from experiments.config import load_config, with_training
from extract.settings import ExtractConfig
from heads.settings import TrainConfig, auto_batch_size

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_loads_with_the_paper_label_order():
    config = load_config(ROOT / "cxr14.toml")
    assert config.labels == LABELS
    assert config.labels[0] == "Atelectasis" and config.labels[-1] == "Hernia"
    assert config.backbones["resnet_v2_50"].source == "hub"
    assert config.backbones["offline_cnn"].source == "random"
    assert config.heads["fc"].units == (512, 256)
    assert config.data_dir == ROOT / "data"
    assert config.split.fractions == (0.7, 0.1, 0.2)


def test_relative_paths_are_from_the_config_folder(tmp_path):
    config = load_config(write(tmp_path, '[data]\ndir = "x"\n[paths]\ncache_dir = "c"\n'))
    assert config.data_dir == tmp_path / "x"
    assert config.cache_dir == tmp_path / "c"
    assert config.runs_dir == tmp_path / "runs"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[train]\nepochz = 3\n", "train.epochz"),
        ("[train]\nepochs = 'ten'\n", "train.epochs"),
        ("[train]\nmetadata = 1\n", "train.metadata"),
        ("[split]\npolicy = 'random'\n", "split.policy"),
        ("[split]\nfractions = [0.5, 0.5]\n", "split.fractions"),
        ("[data]\nlabels = ['Atelectasis', 'Flu']\n", "Flu"),
        ("[data]\ndirectory = 'x'\n", "data.directory"),
        ("[backbones.b]\nsource = 'hub'\nimage_size = 224\npreprocess = 'unit'\n", "backbones.b.handle"),
        ("[backbones.b]\nsource = 'keras'\nimage_size = 224\n", "preprocess"),
        ("[backbones.b]\nsource = 'onnx'\nimage_size = 224\npreprocess = 'unit'\n", "backbones.b.source"),
        ("[heads.fc]\nunits = [512, 'x']\n", "heads.fc.units[1]"),
        ("[heads.mlp]\nunits = [1]\n", "heads.mlp"),
        ("[extract]\ndtype = 'int8'\n", "extract.dtype"),
        ("[decision]\ncalibration = 'beta'\n", "decision.calibration"),
        ("[decision]\nthreshold = 0.5\n", "decision.threshold"),
        ("colour = 1\n", "colour"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key_and_the_file(tmp_path, text, needle):
    path, message = _refused(tmp_path, text)
    assert needle in message
    assert str(path) in message


def _refused(tmp_path, text: str) -> tuple[Path, str]:
    """The config file written from `text`, and the message loading it is refused with."""
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_config(path)
    return path, str(err.value)


def test_ints_are_accepted_for_floats(tmp_path):
    config = load_config(write(tmp_path, "[train]\nlr = 1\n"))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("[train]\nlr = -0.1\n", "train.lr = -0.1 is out of range"),
        ("[train]\nepochs = 0\n", "train.epochs = 0 is out of range"),
        ("[train]\nbatch_size = 0\n", "train.batch_size = 0"),
        ("[heads.fc]\nunits = [512, -3]\n", "heads.fc.units"),
        ("[heads.fc]\ndropout = 1.0\n", "heads.fc.dropout = 1.0 must be below 1.0"),
        ("[extract]\nviews = 0\n", "extract.views = 0"),
        ("[decision]\ntarget = 1.5\n", "decision.target = 1.5 is out of range"),
        ("[decision]\noperating_point = 'f1'\n", "decision.operating_point = 'f1' is not one of"),
        ("[decision]\nbins = 1\n", "decision.bins = 1"),
        ("[extract]\ndtype = 'float64'\n", "extract.dtype = 'float64' is not one of"),
        ("[heads.mlp]\nunits = [3]\n", "[heads.mlp] = 'mlp' is not one of"),
        ("[backbones.b]\nsource = 'random'\nimage_size = 100000\npreprocess = 'unit'\n", "image_size"),
        ("[backbones.b]\nsource = 'random'\nimage_size = 64\npreprocess = 'unit'\nseed = -1\n", "seed = -1"),
        # A grid finer than the random backbone's feature map only repeats cells, and multiplies memory.
        (
            "[backbones.b]\nsource = 'random'\nimage_size = 32\npreprocess = 'unit'\ngrid = 5\n",
            "backbones.b.grid = 5 is larger than the 4x4 feature map of a 32-pixel image",
        ),
        ("[extract]\nmax_pixels = 0\n", "extract.max_pixels = 0 is out of range"),
        ("[train]\nseed = -2\n", "train.seed = -2"),
        ("[heads.fc]\nunits = [0]\n", "heads.fc.units = [0]"),
    ],
)
def test_values_out_of_range_name_the_key(tmp_path, toml, needle):
    path, message = _refused(tmp_path, toml)
    assert needle in message and str(path) in message


def test_overrides_are_checked_like_the_toml():
    with pytest.raises(InputError, match="extract.batch_size = 0"):
        override(ExtractConfig(), batch_size=0)
    assert override(ExtractConfig(), views=None) == ExtractConfig()
    config = load_config(ROOT / "cxr14.toml")
    changed = with_training(config, kind="fc", lr=0.01, dropout=0.25, units=None)
    assert changed.train.lr == 0.01 and changed.heads["fc"].dropout == 0.25
    assert changed.heads["fc"].units == config.heads["fc"].units
    with pytest.raises(InputError, match="train.epochs = 0"):
        with_training(config, kind="fc", epochs=0)
    with pytest.raises(InputError, match="not one of"):
        with_training(config, kind="mlp")


def test_an_auto_batch_size_suits_the_training_set(tmp_path):
    assert load_config(ROOT / "cxr14.toml").train.batch_size == "auto"
    # The demo's sample (~1,470 training images) gets 128, the full set (~78,000) 1024, a tiny set 32.
    assert [auto_batch_size(n) for n in (100, 1470, 5000, 78_000)] == [32, 128, 256, 1024]
    assert TrainConfig().sized_for(1470).batch_size == 128
    assert TrainConfig(batch_size=512).sized_for(1470).batch_size == 512  # a number is kept
    assert load_config(write(tmp_path, "[train]\nbatch_size = 256\n")).train.batch_size == 256
    with pytest.raises(InputError, match="train.batch_size = 'big' must be a whole number or auto"):
        load_config(write(tmp_path, "[train]\nbatch_size = 'big'\n"))
    with pytest.raises(InputError, match="train.batch_size must be int or str, got float"):
        load_config(write(tmp_path, "[train]\nbatch_size = 12.5\n"))


def test_unknown_backbone_lists_the_configured_ones():
    config = load_config(ROOT / "cxr14.toml")
    with pytest.raises(InputError, match="offline_cnn"):
        config.backbone("resnet152")


def test_frozen_dir_is_taken_from_the_config_folder(tmp_path):
    config = load_config(write(tmp_path, "[split]\npolicy = 'frozen'\nfrozen_dir = 'splits'\n"))
    assert config.split.frozen_dir == str(tmp_path / "splits")
    assert load_config(write(tmp_path, "")).split.frozen_dir == ""


def test_the_pixel_limit_is_in_the_shipped_config_with_a_comment():
    text = (ROOT / "cxr14.toml").read_text()
    assert "\nmax_pixels = 25000000\n" in text or "\nmax_pixels = 25_000_000\n" in text
    comment = text.split("max_pixels =")[0].rsplit("\n\n", 1)[-1]
    assert "decod" in comment
    assert load_config(ROOT / "cxr14.toml").extract.max_pixels == 25_000_000 == ExtractConfig().max_pixels
