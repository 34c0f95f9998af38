"""Every name a settings module allows has the code that implements it, and every implementation has its
name: a rule has one owner, and a missing entry fails here rather than at run time."""

import dataclasses

import numpy as np
import pytest

from dataset.settings import NORMALIZATIONS
from extract.settings import SOURCES
from heads.settings import HEAD_KINDS, LOSSES, HeadConfig
from results.settings import CALIBRATIONS, OPERATING_POINTS

LABELS = ("a", "b")


def _validation(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [1, 1], [0, 0]] * 5)
    return y, np.clip(0.6 * y + 0.4 * rng.random(y.shape), 0.01, 0.99)


def test_every_backbone_source_has_a_loader_and_every_loader_a_source():
    from extract.backbones import LOADERS

    assert set(LOADERS) == set(SOURCES)


def test_every_head_kind_has_a_trunk_and_every_trunk_a_kind():
    from heads.models import TRUNKS

    assert {kind.trunk for kind in HEAD_KINDS.values()} == set(TRUNKS)


def test_every_head_option_is_a_head_setting():
    fields = {f.name for f in dataclasses.fields(HeadConfig)}
    for kind in HEAD_KINDS.values():
        assert set(kind.options) <= fields, kind.name


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_is_made(name):
    from heads.losses import make_loss

    y, p = _validation()
    loss = make_loss(name, labels_train=y)
    assert np.isfinite(float(loss(y.astype("float32"), p.astype("float32"))))


@pytest.mark.parametrize("method", CALIBRATIONS)
def test_every_calibration_is_fitted(method):
    from results.calibration import fit_calibration

    y, p = _validation()
    fitted = fit_calibration(y, p, method=method, label_names=LABELS)
    assert fitted["method"] == method


@pytest.mark.parametrize("method", OPERATING_POINTS)
def test_every_operating_point_is_chosen(method):
    from results.operating import choose_thresholds

    y, p = _validation()
    chosen = choose_thresholds(y, p, method=method, target=0.8, label_names=LABELS)
    assert chosen["method"] == method and set(chosen["labels"]) == set(LABELS)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_every_normalization_is_applied(normalization):
    import tensorflow as tf

    from dataset.image_loader import ImageSpec, normalize

    spec = ImageSpec(
        size=4, normalization=normalization, keras_family="resnet_v2" if normalization == "keras" else ""
    )
    out = normalize(tf.fill((1, 4, 4, 1), tf.constant(128, tf.uint8)), spec)
    assert out.shape == (1, 4, 4, 3) and bool(tf.reduce_all(tf.math.is_finite(out)))
