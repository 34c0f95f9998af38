"""Attention over backbones with a learned gate per label: a head of one's own for cxr14.

Every input (each backbone's standardized features, and the metadata when the run takes it) becomes a
token of `width` units; each label has its own query, and a softmax over the tokens decides how much
each backbone counts for that label, so Effusion may lean on one backbone and Nodule on another. The
label's mixture goes through a small hidden layer shared by all labels, then the label's own read-out.
The blog's ensemble instead adds per-backbone transitions: one fusion for every label.

    python run.py train-head --head examples/gated_heads.py:gated_attention --backbone a,b
    python run.py train-head --head examples/gated_heads.py:gated_attention --head-option width=128 ...

cxr14 adds the returned logits to its ridge probe's (through a per-label weight starting at zero), so
the head starts at the probe and trains from there, like the built-in heads.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="gated_heads")
class LabelGate(keras.layers.Layer):
    """(batch, tokens, width) -> (batch, labels, width): per label, a softmax-weighted mix of the tokens."""

    def __init__(self, n_labels: int, **kwargs):
        super().__init__(**kwargs)
        self.n_labels = n_labels

    def build(self, shape):
        self.queries = self.add_weight(
            shape=(self.n_labels, shape[-1]), initializer="glorot_uniform", name="queries"
        )

    def call(self, tokens):
        if tokens.shape[1] == 1:  # one input: nothing to choose between
            return ops.repeat(tokens, self.n_labels, axis=1)
        scores = ops.einsum("bkw,lw->blk", tokens, self.queries) / float(tokens.shape[-1]) ** 0.5
        return ops.einsum("blk,bkw->blw", ops.softmax(scores, axis=-1), tokens)

    def get_config(self):
        return {**super().get_config(), "n_labels": self.n_labels}


@keras.saving.register_keras_serializable(package="gated_heads")
class LabelReadout(keras.layers.Layer):
    """(batch, labels, units) -> (batch, labels): each label's own linear read-out of its mixture."""

    def build(self, shape):
        self.kernel = self.add_weight(shape=tuple(shape[1:]), initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(shape=(shape[1],), initializer="zeros", name="bias")

    def call(self, x):
        return ops.sum(x * self.kernel, axis=-1) + self.bias


def gated_attention(
    inputs: dict, *, n_labels: int, width: int = 256, hidden: int = 256, dropout: float = 0.3
):
    """Logits (batch, n_labels) from one token per input, mixed per label by a learned gate."""
    tokens = []
    for name, tensor in inputs.items():
        x = keras.layers.Dense(width, name=f"token_{name}")(tensor)
        x = keras.layers.LayerNormalization(name=f"token_norm_{name}")(x)
        tokens.append(keras.layers.Reshape((1, width))(keras.layers.Activation("gelu")(x)))
    stacked = tokens[0] if len(tokens) == 1 else keras.layers.Concatenate(axis=1)(tokens)
    mixed = LabelGate(n_labels, name="label_gate")(stacked)
    x = keras.layers.Dense(hidden, activation="relu", name="shared_hidden")(mixed)
    x = keras.layers.Dropout(dropout)(x)
    return LabelReadout(name="label_readout")(x)
