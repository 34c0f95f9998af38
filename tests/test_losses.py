import math

import keras
import numpy as np
import pytest

from cxr14.errors import InputError
from heads.losses import (
    FocalLoss,
    WeightedBinaryCrossentropy,
    focal_loss,
    make_loss,
    positive_weights,
    weighted_bce,
)

Y_TRUE = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
Y_PRED = np.array([[0.8, 0.3], [0.4, 0.9]], dtype=np.float32)


def per_sample(loss, y_true=Y_TRUE, y_pred=Y_PRED) -> np.ndarray:
    return keras.ops.convert_to_numpy(loss.call(y_true, y_pred))


def test_positive_weights_are_negatives_over_positives_per_label():
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]], dtype=np.uint8)
    # label 0: 3 negatives / 1 positive; label 1: no positives; label 2: 1 negative / 3 positives
    np.testing.assert_allclose(positive_weights(labels), [3.0, 1.0, 1 / 3])
    assert positive_weights(labels).dtype == np.float32


def test_positive_weights_is_one_for_a_label_with_only_positives():
    assert positive_weights(np.ones((5, 1)))[0] == 1.0


def test_weighted_bce_matches_hand_computation():
    loss = weighted_bce([3.0, 0.5])
    # sample 1: label 0 positive (p=.8, w=3), label 1 negative (p=.3)
    first = (3.0 * -math.log(0.8) + -math.log(0.7)) / 2
    # sample 2: label 0 negative (p=.4), label 1 positive (p=.9, w=.5)
    second = (-math.log(0.6) + 0.5 * -math.log(0.9)) / 2
    np.testing.assert_allclose(per_sample(loss), [first, second], rtol=1e-5)
    # called as a Keras loss it averages over the batch
    assert float(loss(Y_TRUE, Y_PRED)) == pytest.approx((first + second) / 2, rel=1e-5)


def test_weighted_bce_with_unit_weights_is_keras_bce():
    expected = keras.ops.convert_to_numpy(keras.losses.binary_crossentropy(Y_TRUE, Y_PRED))
    np.testing.assert_allclose(per_sample(weighted_bce([1.0, 1.0])), expected, rtol=1e-5)


def test_focal_loss_matches_hand_computation():
    gamma = 2.0
    # p_t: probability given to the true class
    first = (-((1 - 0.8) ** gamma) * math.log(0.8) - (1 - 0.7) ** gamma * math.log(0.7)) / 2
    second = (-((1 - 0.6) ** gamma) * math.log(0.6) - (1 - 0.9) ** gamma * math.log(0.9)) / 2
    np.testing.assert_allclose(per_sample(focal_loss(gamma)), [first, second], rtol=1e-5)


def test_focal_loss_with_alpha_weights_positives_and_negatives():
    alpha = 0.25
    first = (alpha * -(0.2**2) * math.log(0.8) + (1 - alpha) * -(0.3**2) * math.log(0.7)) / 2
    second = ((1 - alpha) * -(0.4**2) * math.log(0.6) + alpha * -(0.1**2) * math.log(0.9)) / 2
    np.testing.assert_allclose(per_sample(focal_loss(2.0, alpha=alpha)), [first, second], rtol=1e-5)


def test_focal_loss_with_gamma_zero_is_bce():
    expected = keras.ops.convert_to_numpy(keras.losses.binary_crossentropy(Y_TRUE, Y_PRED))
    np.testing.assert_allclose(per_sample(focal_loss(0.0)), expected, rtol=1e-5)


def test_losses_accept_integer_labels():
    value = per_sample(weighted_bce([2.0, 2.0]), y_true=Y_TRUE.astype(np.uint8))
    np.testing.assert_allclose(value, per_sample(weighted_bce([2.0, 2.0])))


def test_make_loss_builds_each_kind():
    labels = np.array([[1, 0], [0, 0], [0, 1], [0, 0]])
    assert isinstance(make_loss("bce", labels_train=labels, gamma=2.0), keras.losses.BinaryCrossentropy)
    weighted = make_loss("weighted", labels_train=labels, gamma=2.0)
    assert isinstance(weighted, WeightedBinaryCrossentropy) and weighted.pos_weight == [3.0, 3.0]
    focal = make_loss("focal", labels_train=labels, gamma=1.5)
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.5


def test_make_loss_unknown_name_lists_valid_ones():
    with pytest.raises(InputError, match="'hinge'.*bce, weighted, focal"):
        make_loss("hinge", labels_train=np.zeros((2, 2)), gamma=2.0)


def test_focal_loss_rejects_negative_gamma():
    with pytest.raises(InputError, match="focal_gamma"):
        focal_loss(-1.0)


@pytest.mark.parametrize("name", ["weighted", "focal"])
def test_model_with_custom_loss_trains_and_reloads(tmp_path, name):
    labels = np.array([[1, 0], [0, 1], [0, 0], [1, 1]], dtype=np.float32)
    features = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="sigmoid")(inputs))
    model.compile(optimizer="adam", loss=make_loss(name, labels_train=labels, gamma=2.0))
    history = model.fit(features, labels, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    assert reloaded.loss.get_config() == model.loss.get_config()
    np.testing.assert_allclose(reloaded.predict(features, verbose=0), model.predict(features, verbose=0))
