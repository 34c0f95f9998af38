"""The heads (Keras 3): a trunk over the inputs, optional fully-connected layers, one sigmoid per label.

Every head takes one named input per backbone (the backbone's name; plus "metadata" when asked). The kinds
are listed in heads/settings.py; each names its trunk here (TRUNKS). Layer seeds are derived from `seed`,
so a head is the same every build.
"""

import itertools
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from cxr14.errors import InputError
from heads.data import METADATA_INPUT
from heads.settings import HeadConfig, HeadKind, head_kind, kind_of
from heads.start import HeadStart


def build_head(
    *,
    kind: str,
    inputs: dict[str, tuple],
    n_labels: int,
    head: HeadConfig,
    metadata_dim: int = 0,
    seed: int,
    byte_dropout: bool = False,
    start: HeadStart | None = None,
    from_probe: bool = True,
) -> keras.Model:
    """A head of `kind` over inputs {backbone name: per-example shape}; outputs (batch, n_labels) in [0, 1].

    With `start` (feature heads in training), every input is standardized by its training moments inside
    the model. `from_probe`: the logits are the probe's frozen ones plus the head's own, and the head's own
    output layer starts at zero, so the untrained head is the probe; otherwise the head's seeded random
    layers alone make the logits (train.start = "none"). byte_dropout swaps keras Dropout for ByteDropout
    (same weights, cheaper masks) for training only; save the stock head, with the trained weights copied
    in, so model.keras needs no custom layer.
    """
    spec = kind_of(head) if head.builder else head_kind(kind)
    check_inputs(spec, inputs=inputs)
    seeds = itertools.count(seed)
    model_inputs = {name: keras.Input(shape=tuple(shape), name=name) for name, shape in inputs.items()}
    if metadata_dim:
        model_inputs[METADATA_INPUT] = keras.Input(shape=(metadata_dim,), name=METADATA_INPUT)
    if head.builder:
        return _file_head(model_inputs, n_labels=n_labels, head=head, start=start, from_probe=from_probe)
    if start is None:
        return _plain_head(
            spec, model_inputs, n_labels=n_labels, head=head, seeds=seeds, byte_dropout=byte_dropout
        )
    standard = {name: _standardized(t, start=start, name=name) for name, t in model_inputs.items()}
    if not from_probe:
        return _plain_head(
            spec,
            model_inputs,
            n_labels=n_labels,
            head=head,
            seeds=seeds,
            byte_dropout=byte_dropout,
            given=standard,
        )
    joined = _join([_pooled(standard[name], start=start, name=name) for name in start.inputs])
    logits = [_shortcut(joined, start=start)]
    if spec.hidden:
        metadata = standard.pop(METADATA_INPUT, None)
        guide = {"start": start} if spec.trunk in TOKEN_TRUNKS else {}
        x = TRUNKS[spec.trunk](standard, head=head, seeds=seeds, **guide)
        x = _join([x, metadata]) if metadata is not None else x
        x = _fully_connected(x, head=head, seeds=seeds, byte_dropout=byte_dropout)
        logits.append(keras.layers.Dense(n_labels, kernel_initializer="zeros", name="head_logits")(x))
    if start.directions.shape[1]:
        logits.append(_spread_logits(joined, start=start))
    logit = _sum(logits)
    return keras.Model(
        model_inputs, keras.layers.Activation("sigmoid", name="labels")(logit), name=f"{kind}_head"
    )


def _plain_head(
    spec: HeadKind,
    model_inputs: dict,
    *,
    n_labels: int,
    head: HeadConfig,
    seeds,
    byte_dropout: bool,
    given: dict | None = None,
):
    """A head randomly initialised from its seeds, on `given` (the standardized inputs of a feature head
    started from none) or the inputs as they come (the cnn's)."""
    given = model_inputs if given is None else given
    tensors = {name: t for name, t in given.items() if name != METADATA_INPUT}
    x = TRUNKS[spec.trunk](tensors, head=head, seeds=seeds)
    if METADATA_INPUT in given:
        x = _join([x, given[METADATA_INPUT]])
    if spec.hidden:
        x = _fully_connected(x, head=head, seeds=seeds, byte_dropout=byte_dropout)
    outputs = _dense(n_labels, "sigmoid", head=head, seeds=seeds, name="labels")(x)
    return keras.Model(model_inputs, outputs, name=f"{spec.name}_head")


def _file_head(
    model_inputs: dict, *, n_labels: int, head: HeadConfig, start: HeadStart | None, from_probe: bool
):
    """A head from the user's file (heads/custom.py) on the standardized inputs; started from the probe,
    its logits are scaled per label by weights starting at zero and added to the probe's, so it too starts
    at the reference (its own last layer cannot be zeroed: it may be anything)."""
    from heads.custom import file_head_logits

    given = model_inputs
    if start is not None:
        given = {name: _standardized(t, start=start, name=name) for name, t in model_inputs.items()}
    logit = file_head_logits(head.builder, given, n_labels=n_labels, options=head.options)
    if start is not None and from_probe:
        joined = _join([_pooled(given[name], start=start, name=name) for name in start.inputs])
        logit = keras.layers.Add()([_shortcut(joined, start=start), LabelScale(name="head_scale")(logit)])
    try:
        return keras.Model(
            model_inputs, keras.layers.Activation("sigmoid", name="labels")(logit), name=f"{head.kind}_head"
        )
    except ValueError as err:
        raise InputError(
            f"{head.builder}: its logits do not come from the inputs it was given ({err})"
        ) from None


@keras.saving.register_keras_serializable(package="cxr14")
class LabelScale(keras.layers.Layer):
    """One weight per label multiplying that label's logit, starting at zero."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="scale")

    def call(self, x):
        return x * self.scale


def _pooled(tensor, *, start: HeadStart, name: str):
    """A token map's mean over its tokens, standardized as the probe's input was (heads/start.py); a
    vector as is. Tokens are standardized by the pooled mean and their own sd, so their mean is the
    standardized pooled vector once rescaled by (token sd / pooled sd), per channel."""
    if len(tensor.shape) != 3:
        return tensor
    pooled = keras.layers.GlobalAveragePooling1D(name=f"pooled_{name}")(tensor)
    _, variance = start.moments(name)
    ratio = (np.sqrt(variance) / start.token_scales[name]) ** 2  # Normalization divides by its sqrt
    return keras.layers.Normalization(mean=np.zeros_like(ratio), variance=ratio, name=f"rescale_{name}")(
        pooled
    )


def _standardized(tensor, *, start: HeadStart, name: str):
    mean, variance = start.moments(name)
    if name in start.token_scales:
        variance = start.token_scales[name] ** 2
    return keras.layers.Normalization(mean=mean, variance=variance, name=f"standardize_{name}")(tensor)


def _shortcut(joined, *, start: HeadStart):
    """The probe's Platt-scaled logits, frozen: the head adds to the reference, it does not relearn it."""
    return keras.layers.Dense(
        start.kernel.shape[1],
        kernel_initializer=keras.initializers.Constant(start.kernel.astype("float32")),
        bias_initializer=keras.initializers.Constant(start.bias.astype("float32")),
        trainable=False,
        name="probe_logits",
    )(joined)


def _spread_logits(joined, *, start: HeadStart):
    """ReLU units on +v and -v for each second-order direction v (so |v.x| is in reach), their logits
    starting at the closed-form optimum beside the probe; both layers train with the rest."""
    directions = start.directions.astype("float32")
    units = keras.layers.Dense(
        2 * directions.shape[1],
        activation="relu",
        kernel_initializer=keras.initializers.Constant(np.concatenate([directions, -directions], axis=1)),
        name="spread_units",
    )(joined)
    return keras.layers.Dense(
        start.direction_weights.shape[1],
        use_bias=False,
        kernel_initializer=keras.initializers.Constant(start.direction_weights.astype("float32")),
        name="spread_logits",
    )(units)


def _sum(tensors: list):
    return tensors[0] if len(tensors) == 1 else keras.layers.Add()(tensors)


def check_inputs(spec: HeadKind, *, inputs: dict[str, tuple]) -> None:
    """Refuse inputs the kind cannot take: their number, their shapes, a backbone called "metadata"."""
    if not inputs:
        raise InputError("a head needs at least one backbone's features")
    if METADATA_INPUT in inputs:
        raise InputError(
            f"a backbone may not be called {METADATA_INPUT!r}: that input name is the metadata's"
        )
    most = spec.max_backbones or len(inputs)
    if not spec.min_backbones <= len(inputs) <= most:
        wanted = spec.min_backbones if most == spec.min_backbones else f"{spec.min_backbones} or more"
        raise InputError(f"the {spec.name} head takes {wanted} backbone(s), got {list(inputs)}")
    ranks = (2, 3) if spec.takes == "pixels" else (2,) if spec.trunk in TOKEN_TRUNKS else (1,)
    if spec.trunk == "file":
        ranks = (1, 2)  # a head of one's own may take token maps too
    if any(len(shape) not in ranks for shape in inputs.values()):
        what = {
            (2, 3): "one cached pixel array (S, S)",
            (2,): "a token map (T, C)",
            (1,): "one feature vector",
        }
        hint = ""
        if ranks == (2,):
            hint = '; extract the backbone with output = "map" in its [backbones.NAME] table'
        elif ranks == (1,) and any(len(shape) == 2 for shape in inputs.values()):
            hint = '; a token cache (output = "map") trains the attention or attentive heads'
        raise InputError(
            f"the {spec.name} head takes {what[ranks]} per image, got input shapes {dict(inputs)}{hint}"
        )


def _dense(units: int, activation: str, *, head: HeadConfig, seeds: Iterator[int], name=None):
    return keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
        kernel_regularizer=keras.regularizers.L2(head.l2) if head.l2 else None,
        name=name,
    )


def _join(tensors: list) -> keras.KerasTensor:
    return tensors[0] if len(tensors) == 1 else keras.layers.Concatenate()(tensors)


def _concatenated(tensors: dict, *, head: HeadConfig, seeds: Iterator[int]):
    """The features themselves, concatenated when there are several."""
    return _join(list(tensors.values()))


def _fully_connected(x, *, head: HeadConfig, seeds: Iterator[int], byte_dropout: bool):
    """The blog's FC block: Dense + ReLU + dropout per entry of head.units."""
    dropout = ByteDropout if byte_dropout else keras.layers.Dropout
    for units in head.units:
        x = _dense(units, "relu", head=head, seeds=seeds)(x)
        if head.dropout:
            x = dropout(head.dropout, seed=next(seeds))(x)
    return x


class ByteDropout(keras.layers.Layer):
    """Dropout whose mask comes from random bytes, four per 32-bit draw, with the rate rounded to 1/256.

    keras Dropout draws a float per unit, which costs ~15% of an fc epoch on CPU; this costs a third.
    Training only: it has no weights, so a stock head built alongside takes the trained weights.
    """

    def __init__(self, rate: float, *, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.threshold = round(rate * 256)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.threshold == 0:
            return x
        draws = -(-x.shape[-1] // 4)  # 4 bytes per int32 draw
        bits = tf.random.stateless_uniform(
            (tf.shape(x)[0], draws), seed=self.seed_generator.next(), minval=None, maxval=None, dtype=tf.int32
        )
        random_bytes = tf.reshape(tf.bitcast(bits, tf.uint8), (-1, 4 * draws))[:, : x.shape[-1]]
        keep = random_bytes >= tf.constant(self.threshold, tf.uint8)
        return tf.where(keep, x * (256.0 / (256 - self.threshold)), tf.zeros_like(x))


def _fuse(tensors: dict, *, head: HeadConfig, seeds: Iterator[int]):
    """The blog's model 3: each backbone to a common width by its own transition Dense, then add."""
    transitions = [
        _dense(head.transition, "relu", head=head, seeds=seeds, name=f"transition_{i}")(t)
        for i, t in enumerate(tensors.values())
    ]
    if head.fusion == "add":
        return keras.layers.Add()(transitions)
    return keras.layers.Concatenate()(transitions)


CNN_GRID = 4  # the conv tower ends on a CNN_GRID x CNN_GRID map, flattened


def _conv_tower(pixels: dict, *, head: HeadConfig, seeds: Iterator[int]):
    """The blog's base-case CNN on cached 0..255 pixels: per-image standardisation (the blog's own
    preprocessing), conv-ReLU-maxpool blocks, then a coarse spatial grid, flattened.

    The grid keeps *where* a finding is (an effusion sits at the base, a hernia at the diaphragm): with
    global average pooling instead, this tower did not learn the sample's findings at all (validation
    mean AUC 0.39 after six epochs; 0.94 after four with the grid). No batch normalisation: its moving
    averages lag behind the few hundred steps a cached-pixel run takes, and the test AUC fell below 0.5.
    """
    pixels = next(iter(pixels.values()))
    x = pixels
    if len(pixels.shape) == 3:
        x = keras.layers.Reshape((*pixels.shape[1:], 1))(x)
    x = keras.layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False, name="standardize")(x)
    for filters in head.filters:
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            activation="relu",
            kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
            kernel_regularizer=keras.regularizers.L2(head.l2) if head.l2 else None,
        )(x)
        x = keras.layers.MaxPooling2D(2)(x)
    size = x.shape[1]
    if size > CNN_GRID:
        x = keras.layers.AveragePooling2D(size // CNN_GRID)(x)
    return keras.layers.Flatten()(x)


@keras.saving.register_keras_serializable(package="cxr14")
class GatedAttentionPool(keras.layers.Layer):
    """Gated-attention MIL pooling (Ilse et al. 2018): token t gets weight softmax_t(w . (tanh(V h_t) *
    sigmoid(U h_t)) + e_t), and the image is the weighted sum of its tokens, (b, T, C) -> (b, C).

    With `evidence` = L labels, e_t = logsumexp over labels of L per-token logits (a Dense of the tokens,
    trained with the rest; guide starts it as the probe's): the log of how likely token t is to hold any
    finding, so the attention starts on the tokens that look like findings. `token_weights` gives the
    weights, (b, T): where the head looked (--heatmap-method attention)."""

    def __init__(self, hidden: int, *, seed: int, evidence: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.seed, self.evidence = hidden, seed, evidence
        glorot = keras.initializers.GlorotUniform
        self.tanh_gate = keras.layers.Dense(hidden, activation="tanh", kernel_initializer=glorot(seed))
        self.sigmoid_gate = keras.layers.Dense(
            hidden, activation="sigmoid", kernel_initializer=glorot(seed + 1)
        )
        self.score = keras.layers.Dense(1, kernel_initializer=glorot(seed + 2))
        self.label_logits = keras.layers.Dense(evidence, kernel_initializer="zeros") if evidence else None

    def build(self, input_shape):
        for layer in (self.tanh_gate, self.sigmoid_gate, self.label_logits):
            if layer is not None:
                layer.build(input_shape)
        self.score.build((*input_shape[:-1], self.hidden))

    def guide(self, kernel: np.ndarray, bias: np.ndarray) -> None:
        """Start the evidence term as the probe's logits of each token (kernel (C, L), bias (L,)) and the
        gated term at zero (its score kernel), so the attention starts where the probe sees findings.

        A uniform start is mean pooling, the probe's own view, and the head's output layer starts at zero,
        so nothing in it moves the attention at first: at full size it saw no better validation epoch in
        six and stopped. Measured on the planted local problem (30,000 rows, 64 channels), the attention
        frozen at its start and a ridge readout of the pooled tokens: uniform 0.624 test mean AUC; the
        former guide, gate units tanh of each label's token logit without its bias, summed, 0.595 (the
        12 labels a token does not hold add saturated noise to every score); this one 0.711 (the rare
        labels' low biases keep their noise out). Trained: +0.029 over the probe, then +0.085."""
        n = min(kernel.shape[1], self.evidence)
        self.label_logits.set_weights([kernel[:, :n], bias[:n]])
        score_kernel, score_bias = self.score.get_weights()
        self.score.set_weights([np.zeros_like(score_kernel), score_bias])

    def token_weights(self, tokens):
        gated = self.tanh_gate(tokens) * self.sigmoid_gate(tokens)
        score = keras.ops.squeeze(self.score(gated), -1)
        if self.label_logits is not None:
            score = score + _evidence(self.label_logits, tokens)
        return keras.ops.softmax(score, axis=-1)

    def call(self, tokens):
        return keras.ops.einsum("bt,btc->bc", self.token_weights(tokens), tokens)

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "seed": self.seed, "evidence": self.evidence}


ATTENTIVE_HEADS = 4  # the attentive probe's attention heads: its width is split among them


@keras.saving.register_keras_serializable(package="cxr14")
class AttentiveProbe(keras.layers.Layer):
    """One cross-attention block: a learned query attends over the tokens with ATTENTIVE_HEADS heads,
    (b, T, C) -> (b, width), the heads' values concatenated. `token_weights`: the heads' mean weights.
    With `evidence` = L labels, every head's attention logits also get the gated attention's evidence
    term (GatedAttentionPool), which guide starts as the probe's."""

    def __init__(self, width: int, *, seed: int, evidence: int = 0, **kwargs):
        super().__init__(**kwargs)
        if width % ATTENTIVE_HEADS:
            raise InputError(
                f"heads.attentive.transition = {width}: the attentive probe splits it among "
                f"{ATTENTIVE_HEADS} heads; use a multiple of {ATTENTIVE_HEADS}"
            )
        self.width, self.seed, self.evidence = width, seed, evidence
        glorot = keras.initializers.GlorotUniform
        self.keys = keras.layers.Dense(width, kernel_initializer=glorot(seed))
        self.values = keras.layers.Dense(width, kernel_initializer=glorot(seed + 1))
        self.label_logits = keras.layers.Dense(evidence, kernel_initializer="zeros") if evidence else None

    def build(self, input_shape):
        for layer in (self.keys, self.values, self.label_logits):
            if layer is not None:
                layer.build(input_shape)
        init = keras.initializers.RandomNormal(stddev=self.width**-0.5, seed=self.seed + 2)
        self.query = self.add_weight(shape=(self.width,), initializer=init, name="query")

    def _split(self, x):
        return keras.ops.reshape(x, (-1, x.shape[1], ATTENTIVE_HEADS, self.width // ATTENTIVE_HEADS))

    def _per_head(self, tokens):
        keys = self._split(self.keys(tokens))  # (b, T, heads, d)
        query = keras.ops.reshape(self.query, (ATTENTIVE_HEADS, self.width // ATTENTIVE_HEADS))
        logits = keras.ops.einsum("bthd,hd->bht", keys, query) * (self.width // ATTENTIVE_HEADS) ** -0.5
        if self.label_logits is not None:
            logits = logits + _evidence(self.label_logits, tokens)[:, None, :]
        return keras.ops.softmax(logits, axis=-1)  # (b, heads, T)

    def guide(self, kernel: np.ndarray, bias: np.ndarray) -> None:
        """Start the evidence term as the probe's logits of each token (as GatedAttentionPool.guide) and
        the query at zero, so every head starts where the probe sees findings, not at random tokens."""
        n = min(kernel.shape[1], self.evidence)
        self.label_logits.set_weights([kernel[:, :n], bias[:n]])
        self.query.assign(np.zeros(self.width, np.float32))

    def token_weights(self, tokens):
        return keras.ops.mean(self._per_head(tokens), axis=1)

    def call(self, tokens):
        mixed = keras.ops.einsum("bht,bthd->bhd", self._per_head(tokens), self._split(self.values(tokens)))
        return keras.ops.reshape(mixed, (-1, self.width))

    def get_config(self):
        return {**super().get_config(), "width": self.width, "seed": self.seed, "evidence": self.evidence}


def _evidence(label_logits: keras.layers.Dense, tokens):
    """(b, T): logsumexp over labels of each token's logits, the log of how likely it holds a finding."""
    return keras.ops.logsumexp(label_logits(tokens), axis=-1)


def _attention(tensors: dict, *, head: HeadConfig, seeds: Iterator[int], start: HeadStart | None = None):
    """Each token map pooled by its own gated attention (named attention_<input>), then fused
    (_fuse_backbones); started at the probe, each attention starts where the probe scores the tokens
    highest (guide)."""
    pooled = []
    for name, tokens in tensors.items():
        evidence = 0 if start is None else start.kernel.shape[1]
        layer = GatedAttentionPool(
            head.transition, seed=next(seeds), evidence=evidence, name=f"attention_{name}"
        )
        pooled.append(layer(tokens))
        if start is not None:
            layer.guide(token_logit_kernel(start, name), start.bias.astype(np.float32))
    return _fuse_backbones(dict(zip(tensors, pooled, strict=True)), head=head, seeds=seeds)


def _fuse_backbones(pooled: dict, *, head: HeadConfig, seeds: Iterator[int]):
    """One backbone's pooled tokens as they are; several backbones' as the blog's model 3 fuses pooled
    features: each to head.transition units by its own transition Dense (token_transition_<input>),
    then head.fusion ("add" or "concat"). The seeds of one backbone's head stay as they were."""
    if len(pooled) == 1:
        return next(iter(pooled.values()))
    transitions = [
        _dense(head.transition, "relu", head=head, seeds=seeds, name=f"token_transition_{name}")(x)
        for name, x in pooled.items()
    ]
    if head.fusion == "add":
        return keras.layers.Add(name="token_fusion")(transitions)
    return keras.layers.Concatenate(name="token_fusion")(transitions)


def token_logit_kernel(start: HeadStart, name: str) -> np.ndarray:
    """(C, L): the probe's logits of one token standardized as the head's tokens are, as if the whole
    image looked like it (its kernel block for `name`, rescaled from the pooled sd to the tokens' sd)."""
    offset = 0
    for other, width in start.inputs.items():
        if other == name:
            break
        offset += width
    _, variance = start.moments(name)
    block = start.kernel[offset : offset + start.inputs[name]]
    return (block * (start.token_scales[name] / np.sqrt(variance))[:, None]).astype(np.float32)


def _attentive(tensors: dict, *, head: HeadConfig, seeds: Iterator[int], start: HeadStart | None = None):
    """Each token map read by its own attentive probe (named attention_<input>), then fused
    (_fuse_backbones); started at the probe, each starts where the probe sees findings (guide)."""
    read = []
    for name, tokens in tensors.items():
        evidence = 0 if start is None else start.kernel.shape[1]
        layer = AttentiveProbe(head.transition, seed=next(seeds), evidence=evidence, name=f"attention_{name}")
        read.append(layer(tokens))
        if start is not None:
            layer.guide(token_logit_kernel(start, name), start.bias.astype(np.float32))
    return _fuse_backbones(dict(zip(tensors, read, strict=True)), head=head, seeds=seeds)


def token_attention(model: keras.Model, name: str):
    """The layer of a token head that weighs input `name`'s tokens (its `token_weights`), or None."""
    try:
        layer = model.get_layer(f"attention_{name}")
    except ValueError:
        return None
    return layer if hasattr(layer, "token_weights") else None


# Trunk name (heads.settings.HeadKind.trunk) -> builder ({name: input tensor}, head, seeds) -> tensor.
TRUNKS = {
    "join": _concatenated,
    "fuse": _fuse,
    "conv": _conv_tower,
    "attention": _attention,
    "attentive": _attentive,
}
TOKEN_TRUNKS = ("attention", "attentive")  # trunks over (T, C) token maps
