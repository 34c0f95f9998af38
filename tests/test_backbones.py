"""Backbones: hub/SavedModel loading (exported by the test), keras.applications, random, pixels."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cxr14.errors import InputError
from dataset.image_loader import normalize
from extract.backbones import BackboneError, grid_pooling_matrix, load_backbone, random_kernels
from extract.settings import BackboneConfig


def _cfg(**kw) -> BackboneConfig:
    defaults = {"name": "b", "source": "random", "image_size": 32, "preprocess": "unit"}
    return BackboneConfig(**(defaults | kw))


def _pixels(n=4, size=16, seed=0) -> np.ndarray:
    """What a backbone takes: uint8 gray (n, size, size, 1)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def _unit_rgb(pixels: np.ndarray) -> np.ndarray:
    """The "unit" normalisation of `pixels` by hand: [0, 1], three channels."""
    return np.repeat(pixels.astype(np.float32) / 255, 3, axis=-1)


def _tiny_keras_model(size=16) -> keras.Model:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x))


class _HubStyle(tf.Module):
    """What a TF Hub image feature-vector model looks like: a callable root with a signature."""

    def __init__(self, model, *, as_dict=False):
        super().__init__()
        self.model = model
        self.as_dict = as_dict

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32)])
    def __call__(self, images):
        features = self.model(images, training=False)
        return {"pooled": features, "twice": 2.0 * features} if self.as_dict else features


# --- hub / SavedModel --------------------------------------------------------------------------------


def test_hub_style_saved_model_matches_original(tmp_path):
    model = _tiny_keras_model()
    tf.saved_model.save(_HubStyle(model), str(tmp_path / "hub"))
    backbone = load_backbone(_cfg(source="hub", handle=str(tmp_path / "hub"), image_size=16))
    x = _pixels()
    assert backbone.kind == "features" and backbone.dim == 5
    assert backbone.spec.channels == 3 and backbone.spec.normalization == "unit"
    assert backbone.feature_map is None  # a feature vector: heatmaps use SmoothGrad
    np.testing.assert_allclose(backbone.fn(x).numpy(), model(_unit_rgb(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_dict_outputs_need_output_key(tmp_path):
    model = _tiny_keras_model()
    tf.saved_model.save(_HubStyle(model, as_dict=True), str(tmp_path / "hub"))
    cfg = _cfg(source="hub", handle=str(tmp_path / "hub"), image_size=16)
    with pytest.raises(BackboneError, match="output_key.*pooled.*twice|pooled.*twice.*output_key"):
        load_backbone(cfg)
    backbone = load_backbone(
        _cfg(source="hub", handle=str(tmp_path / "hub"), image_size=16, output_key="twice")
    )
    x = _pixels()
    np.testing.assert_allclose(backbone.fn(x).numpy(), 2 * model(_unit_rgb(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_keras_export_uses_serve(tmp_path):
    model = _tiny_keras_model()
    model.export(str(tmp_path / "exported"), verbose=False)
    backbone = load_backbone(_cfg(source="hub", handle=str(tmp_path / "exported"), image_size=16))
    x = _pixels()
    np.testing.assert_allclose(backbone.fn(x).numpy(), model(_unit_rgb(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_signature_only_saved_model(tmp_path):
    module = tf.Module()
    module.w = tf.Variable(tf.random.stateless_normal([3, 6], seed=[1, 2]))
    module.f = tf.function(
        lambda images: tf.reduce_mean(images, axis=[1, 2]) @ module.w,
        input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32)],
    )
    tf.saved_model.save(module, str(tmp_path / "sig"), signatures={"serving_default": module.f})
    backbone = load_backbone(_cfg(source="hub", handle=str(tmp_path / "sig"), image_size=16))
    x = _pixels()
    assert backbone.dim == 6
    expected = _unit_rgb(x).mean(axis=(1, 2)) @ module.w.numpy()
    np.testing.assert_allclose(backbone.fn(x).numpy(), expected, rtol=1e-5)


def test_hub_handle_errors_say_what_to_do(tmp_path):
    with pytest.raises(BackboneError, match="neither a SavedModel directory nor a URL"):
        load_backbone(_cfg(source="hub", handle=str(tmp_path / "absent")))
    with pytest.raises(BackboneError, match="TFHUB_CACHE_DIR.*handle to the unpacked SavedModel directory"):
        load_backbone(_cfg(source="hub", handle=f"file://{tmp_path}/absent"))
    with pytest.raises(BackboneError, match='needs source = "keras"'):
        load_backbone(_cfg(source="random", preprocess="keras"))
    assert issubclass(BackboneError, InputError)


def test_unknown_source_and_bad_random_shape_are_refused():
    with pytest.raises(InputError, match="source = 'onnx' is not one of: hub, keras, random, pixels"):
        load_backbone(_cfg(source="onnx"))
    with pytest.raises(InputError, match="backbones.b.width = 0 is out of range"):
        load_backbone(_cfg(width=0, grid=2))


# --- keras.applications -------------------------------------------------------------------------------


def _mobilenet(size=32) -> keras.Model:
    keras.utils.set_random_seed(2)
    return keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
    )


def test_keras_weights_file_and_mixed_precision(tmp_path):
    reference = _mobilenet()
    weights = tmp_path / "mobilenet.weights.h5"
    reference.save_weights(weights)
    cfg = _cfg(source="keras", model="MobileNetV2", weights=str(weights), preprocess="keras")
    backbone = load_backbone(cfg)
    x = _pixels(size=32)
    assert backbone.dim == 1280 and backbone.spec.keras_family == "mobilenet_v2"
    assert backbone.config["resolved"]["keras_family"] == "mobilenet_v2"
    expected = reference(_unit_rgb(x) * 2 - 1, training=False).numpy()  # mobilenet_v2 takes [-1, 1]
    np.testing.assert_allclose(backbone.fn(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    # The map before the global average pooling, for Grad-CAM; values ~1e-13, so relative only.
    maps = backbone.feature_map(normalize(x, backbone.spec))
    assert maps.shape == (4, 1, 1, 1280)
    features = backbone.fn(x).numpy()
    np.testing.assert_allclose(
        backbone.pool(maps).numpy(), features, rtol=1e-4, atol=1e-4 * np.abs(features).max()
    )

    half = load_backbone(cfg, mixed_precision=True)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    out = half.fn(x)
    # Untrained MobileNetV2 activations are ~1e-13, below float16's range, so only form is checked here;
    # test_random_mixed_precision_and_xla_agree compares values.
    assert out.dtype == tf.float32 and out.shape == (4, 1280) and np.isfinite(out.numpy()).all()
    assert half.config["resolved"]["mixed_precision"] is True


def test_keras_errors(tmp_path, monkeypatch):
    with pytest.raises(BackboneError, match="'ResNet51' is not a keras.applications model.*ResNet50V2"):
        load_backbone(_cfg(source="keras", model="ResNet51"))
    with pytest.raises(BackboneError, match="no such file"):
        load_backbone(_cfg(source="keras", model="MobileNetV2", weights=str(tmp_path / "nope.h5")))

    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(BackboneError, match=r"URL fetch failure.*~/.keras/models.*local weights file"):
        # 96 px: an ImageNet size, so keras does not warn that it would load 224 px weights instead
        load_backbone(
            _cfg(source="keras", model="MobileNetV2", weights="imagenet", preprocess="keras", image_size=96)
        )


# --- random -------------------------------------------------------------------------------------------


def test_random_is_seeded_and_sized():
    cfg = _cfg(width=8, grid=2, seed=3)
    a, b = load_backbone(cfg), load_backbone(cfg)
    other = load_backbone(_cfg(width=8, grid=2, seed=4))
    x = _pixels(size=32)
    assert a.dim == 32 and a.spec.channels == 1 and a.kind == "features"
    np.testing.assert_array_equal(a.fn(x).numpy(), b.fn(x).numpy())
    assert not np.allclose(a.fn(x).numpy(), other.fn(x).numpy())
    kernels = random_kernels(width=8, seed=3)
    assert [k.shape for k in kernels] == [(3, 3, 1, 2), (3, 3, 2, 4), (3, 3, 4, 8)]
    np.testing.assert_array_equal(kernels[0], random_kernels(width=8, seed=3)[0])


def test_random_keeps_spatial_layout():
    grid, width = 4, 16
    backbone = load_backbone(_cfg(image_size=64, width=width, grid=grid))
    base = np.full((1, 64, 64, 1), 77, np.uint8)
    blob = base.copy()
    blob[0, 2:14, 2:14, 0] = 255  # top-left cell only
    diff = np.abs(backbone.fn(blob).numpy() - backbone.fn(base).numpy()).reshape(grid, grid, width).sum(-1)
    assert diff[0, 0] > 0 and diff[0, 0] == diff.max()
    assert diff[grid - 1, grid - 1] == 0.0  # far corner untouched: not a global average


def test_random_mixed_precision_and_xla_agree():
    cfg = _cfg(image_size=64)
    x = _pixels(size=64)
    full = load_backbone(cfg).fn(x).numpy()
    np.testing.assert_allclose(load_backbone(cfg, xla=True).fn(x).numpy(), full, rtol=1e-4, atol=1e-5)
    half = load_backbone(cfg, mixed_precision=True).fn(x)
    assert half.dtype == tf.float32
    np.testing.assert_allclose(half.numpy(), full, atol=0.01 * np.abs(full).max())


# --- pixels -------------------------------------------------------------------------------------------


def test_pixels_are_the_bytes_themselves():
    backbone = load_backbone(_cfg(source="pixels", image_size=8, preprocess="bytes"))
    x = _pixels(n=2, size=8)
    out = backbone.fn(x).numpy()
    assert backbone.kind == "pixels" and backbone.dim == 8 and backbone.spec.channels == 1
    assert out.shape == (2, 8, 8)
    np.testing.assert_array_equal(out, x[..., 0])
    with pytest.raises(BackboneError, match='preprocess = "bytes"'):
        load_backbone(_cfg(source="pixels", image_size=8, preprocess="unit"))


def test_grid_pooling_matrix_covers_uneven_sizes():
    np.testing.assert_allclose(grid_pooling_matrix(5, 2), [[1 / 3] * 3 + [0, 0], [0, 0] + [1 / 3] * 3])
    np.testing.assert_allclose(grid_pooling_matrix(8, 4).sum(axis=1), 1.0)
    assert (grid_pooling_matrix(8, 4) > 0).sum(axis=1).tolist() == [2, 2, 2, 2]


def test_heatmaps_reach_inside_the_backbones():
    """Heatmaps need the network on float images (fn takes uint8, which has no gradient) and, for
    Grad-CAM, the map before pooling: the random backbones expose it (keras.applications in
    test_keras_weights_file_and_mixed_precision); hub and pixels backbones have none."""
    backbone = load_backbone(_cfg(width=8, grid=2))
    x = _pixels(size=32)
    images = normalize(x, backbone.spec)
    np.testing.assert_allclose(backbone.net(images).numpy(), backbone.fn(x).numpy(), rtol=1e-5, atol=1e-7)
    maps = backbone.feature_map(images)
    assert maps.shape == (4, 4, 4, 8)  # three stride-2 convs: 32 -> 4
    np.testing.assert_allclose(backbone.pool(maps).numpy(), backbone.fn(x).numpy(), rtol=1e-5, atol=1e-7)
    pixels = load_backbone(_cfg(source="pixels", preprocess="bytes", image_size=16))
    assert pixels.feature_map is None and pixels.net is not None
