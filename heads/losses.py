"""Multi-label losses for the heads: plain, class-balanced and focal binary cross-entropy.

Keras `class_weight` takes the argmax of the targets, which is wrong for multi-hot labels, so class
balance is done inside the loss, per label. The losses are registered Keras classes so that a saved
`model.keras` reloads with its loss once this module is imported.
"""

import keras
import numpy as np
from keras import ops

from cxr14.errors import InputError, check_choice
from heads.settings import LOSSES


def positive_weights(labels: np.ndarray) -> np.ndarray:
    """Per-label weight for positive examples, negatives / positives, from the TRAINING labels.

    A label with no positives or no negatives in training gets weight 1: there is nothing to balance.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise InputError(f"training labels must be an (images, labels) array; received shape {labels.shape}")
    positives = labels.sum(axis=0).astype(np.float64)
    negatives = labels.shape[0] - positives
    balanced = (positives > 0) & (negatives > 0)
    weights = np.divide(negatives, positives, out=np.ones_like(positives), where=balanced)
    return weights.astype(np.float32)


def _clipped(y_true, y_pred):
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    # Same clipping as keras.losses.binary_crossentropy on probabilities, so weights of 1 give its value.
    epsilon = keras.config.epsilon()
    return y_true, ops.clip(y_pred, epsilon, 1.0 - epsilon)


@keras.saving.register_keras_serializable(package="cxr14")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy on sigmoid probabilities with the positive term of label j scaled by w_j."""

    def __init__(self, pos_weight, name: str = "weighted_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = [float(w) for w in np.asarray(pos_weight).ravel()]

    def call(self, y_true, y_pred):
        y_true, p = _clipped(y_true, y_pred)
        weight = ops.convert_to_tensor(self.pos_weight, dtype=p.dtype)
        per_label = -(weight * y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
        return ops.mean(per_label, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "pos_weight": self.pos_weight}


@keras.saving.register_keras_serializable(package="cxr14")
class FocalLoss(keras.losses.Loss):
    """Focal loss (Lin et al. 2017): -alpha_t (1 - p_t)^gamma log(p_t), averaged over labels.

    alpha None means no alpha weighting; alpha a weights positives by alpha and negatives by 1 - alpha.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, name: str = "focal", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)

    def call(self, y_true, y_pred):
        y_true, p = _clipped(y_true, y_pred)
        p_t = y_true * p + (1.0 - y_true) * (1.0 - p)
        per_label = -ops.power(1.0 - p_t, self.gamma) * ops.log(p_t)
        if self.alpha is not None:
            per_label = (y_true * self.alpha + (1.0 - y_true) * (1.0 - self.alpha)) * per_label
        return ops.mean(per_label, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha}


def weighted_bce(pos_weight) -> WeightedBinaryCrossentropy:
    """Loss callable(y_true, y_pred) with per-label positive weights (see positive_weights)."""
    return WeightedBinaryCrossentropy(pos_weight)


def focal_loss(gamma: float = 2.0, alpha: float | None = None) -> FocalLoss:
    """Loss callable(y_true, y_pred) that down-weights easy examples by (1 - p_t)^gamma."""
    if gamma < 0:
        raise InputError(f"focal_gamma must be >= 0; received focal_gamma={gamma}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise InputError(f"focal alpha must be between 0 and 1; received alpha={alpha}")
    return FocalLoss(gamma=gamma, alpha=alpha)


def make_loss(name: str, *, labels_train: np.ndarray, gamma: float = 2.0) -> keras.losses.Loss:
    """The loss named in the config (heads.settings.LOSSES); "weighted" weighs by the training labels."""
    makers = {
        "bce": keras.losses.BinaryCrossentropy,
        "weighted": lambda: weighted_bce(positive_weights(labels_train)),
        "focal": lambda: focal_loss(gamma),
    }
    return makers[check_choice(name, LOSSES, what="train.loss")]()
