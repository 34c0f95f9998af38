"""cxr14.caveats: which backbones count as random-weight, and the one warning line predict and export
print for a run that is not a medical model."""

from cxr14.caveats import not_medical_warning, random_weight_backbones, synthetic_split_source


def test_random_weight_backbones():
    backbones = {
        "offline": {"source": "random", "seed": 0},
        "keras_none": {"source": "keras", "model": "DenseNet121", "weights": "none"},
        "keras_null": {"source": "keras", "model": "DenseNet121", "weights": None},
        "keras_imagenet": {"source": "keras", "model": "DenseNet121", "weights": "imagenet"},
        "keras_file": {"source": "keras", "model": "DenseNet121", "weights": "/models/chexnet.h5"},
        "hub": {"source": "hub", "handle": "models/resnet_v2_50", "weights": "imagenet"},
        "pixels": {"source": "pixels"},
        "own_features": None,
    }
    assert random_weight_backbones(backbones) == ["offline", "keras_none", "keras_null"]


def test_one_warning_line_or_none():
    assert not_medical_warning(synthetic=False, random_backbones=[]) == ""
    both = not_medical_warning(synthetic=True, random_backbones=["a", "b"])
    assert both.startswith(
        "not a medical model: trained on a synthetic sample and random-weight backbone(s) a, b"
    )
    assert "\n" not in both


def test_synthetic_split_sources_never_read_official():
    assert synthetic_split_source("official") == "synthetic sample (official-format lists)"
    assert synthetic_split_source("patient-random") == "synthetic sample (patient-random split)"
    assert synthetic_split_source("frozen") == "synthetic sample (frozen lists)"
