"""Frozen backbones named in the config: a TF Hub / SavedModel handle, a keras.applications model,
a seeded random conv net (offline baseline), or the preprocessed pixels themselves."""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cxr14.errors import InputError
from dataset.image_loader import ImageSpec, normalize
from extract.settings import RANDOM_STAGES, BackboneConfig


class BackboneError(InputError):
    """A backbone that cannot be built or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class Backbone:
    """A loaded backbone. `fn`: uint8 pixels (b, s, s, 1) -> (b, dim) float32, (b, tokens, dim) for a
    token map (output = "map"), or (b, s, s) 0..255 for pixels.

    `fn` casts and normalises the pixels itself (dataset.image_loader.normalize), on the device it runs on.
    """

    name: str
    kind: str  # "features" | "tokens" | "pixels"
    spec: ImageSpec
    dim: int  # feature width (channels of a token map), or the image side for pixels
    fn: Callable
    config: dict  # cfg.as_dict() plus what was resolved at load time, for fingerprints
    # The network on normalised float images (b, s, s, c), fn(pixels) == net(normalize(pixels)); unlike
    # fn's uint8 input, differentiable in its input (SmoothGrad heatmaps).
    net: Callable | None = None
    # Its last convolutional feature map where it exposes one (keras.applications, random), and the
    # pooling that makes the features: net(x) == pool(feature_map(x)). For Grad-CAM heatmaps.
    feature_map: Callable | None = None
    pool: Callable | None = None
    tokens: int = 0  # tokens per image of a token map (kind "tokens"), else 0


@dataclass(frozen=True)
class _Loaded:
    """What a loader returns: the network on normalised images, its image spec, resolved details, and
    where it has one, its split into feature map and pooling (call(x) == pool(feature_map(x)))."""

    call: Callable
    spec: ImageSpec
    resolved: dict
    feature_map: Callable | None = None
    pool: Callable | None = None


def load_backbone(
    cfg: BackboneConfig, *, mixed_precision: bool = False, xla: bool = False, projection=None
) -> Backbone:
    """Build or load the backbone `cfg` names, wrapped in one tf.function with a fixed input signature.
    `projection` (cache.projection.Projection): a token map's channel projection, applied to its tokens,
    as a run trained on a cache reduced in channels (map_channels) needs for new images."""
    loaded = LOADERS[cfg.source](cfg, mixed_precision=mixed_precision)
    call, spec, resolved, pool = loaded.call, loaded.spec, loaded.resolved, loaded.pool
    if projection is not None:
        call, pool = _projected(call, projection), _projected(pool, projection)

    def on_pixels(pixels):
        return call(normalize(pixels, spec))

    # uint8 in: a batch crosses to the device at a quarter of float32's size (a twelfth with one channel
    # instead of three). One signature with a free batch size: padded and short batches share a trace.
    signature = [tf.TensorSpec([None, spec.size, spec.size, 1], tf.uint8)]
    fn = tf.function(on_pixels, input_signature=signature, jit_compile=xla or None)
    probe = fn(tf.zeros([1, spec.size, spec.size, 1], tf.uint8))
    kind = cfg.kind
    dim = spec.size if kind == "pixels" else int(probe.shape[-1])
    tokens = int(probe.shape[1]) if kind == "tokens" else 0
    resolved |= {"kind": kind, "dim": dim, "xla": bool(xla), "spec": spec.as_dict()}
    if tokens:
        resolved["tokens"] = tokens
    return Backbone(
        name=cfg.name,
        kind=kind,
        spec=spec,
        dim=dim,
        fn=fn,
        config=cfg.as_dict() | {"resolved": resolved},
        net=call,
        feature_map=loaded.feature_map,
        pool=pool,
        tokens=tokens,
    )


def _projected(tokens_of: Callable | None, projection) -> Callable | None:
    """`tokens_of` followed by the projection, (tokens - mean) @ components.T, in TensorFlow (so Grad-CAM
    and SmoothGrad differentiate through it, and an export holds it)."""
    if tokens_of is None:
        return None
    mean = tf.constant(projection.mean, tf.float32)
    components = tf.constant(projection.components.T, tf.float32)

    def projected(x):
        return tf.tensordot(tf.cast(tokens_of(x), tf.float32) - mean, components, axes=1)

    return projected


def _spec(cfg: BackboneConfig, *, keras_family: str = "", channels: int = 3) -> ImageSpec:
    if cfg.preprocess == "keras" and not keras_family:
        raise BackboneError(
            f'backbones.{cfg.name}.preprocess = "keras" needs source = "keras" (a keras.applications family); '
            f'use "unit", "standardize" or "bytes" for source = "{cfg.source}"'
        )
    return ImageSpec(
        size=cfg.image_size,
        normalization=cfg.preprocess,
        keras_family=keras_family if cfg.preprocess == "keras" else "",
        channels=channels,
    )


# --- hub / SavedModel -------------------------------------------------------------------------------


def _load_hub(cfg: BackboneConfig, *, mixed_precision: bool):
    model = _load_saved_model(cfg)
    raw = _saved_model_entry(model, cfg)

    def call(images):
        return _as_features(raw(images), cfg)

    # A SavedModel's graph has fixed dtypes, so mixed precision cannot be applied from outside.
    resolved = {
        "loader": "saved_model",
        "mixed_precision": False,
        "mixed_precision_requested": mixed_precision,
    }
    return _Loaded(call, _spec(cfg), resolved)


def _load_saved_model(cfg: BackboneConfig):
    handle = cfg.handle
    local = Path(handle).expanduser()
    if not local.is_dir() and "://" not in handle:
        raise BackboneError(
            f"backbones.{cfg.name}.handle = {handle!r} is neither a SavedModel directory nor a URL "
            "(https://, gs://, file://); point it at the unpacked model folder or its TF Hub/Kaggle URL"
        )
    try:
        if local.is_dir():
            return tf.saved_model.load(str(local))
        import tensorflow_hub as hub  # only hub URLs need it

        return hub.load(handle)
    except Exception as err:  # any failure here means "cannot get the model"; say how to fix it
        raise BackboneError(_hub_help(cfg, err)) from None


def _hub_help(cfg: BackboneConfig, err: Exception) -> str:
    detail = _first_line(err)
    cache = os.environ.get("TFHUB_CACHE_DIR", "not set")
    return (
        f"backbone {cfg.name!r}: cannot load {cfg.handle!r} ({type(err).__name__}: {detail}). "
        "If this machine is offline: load the model once on a machine with network "
        f"(python -c \"import tensorflow_hub as hub; hub.load('{cfg.handle}')\" with TFHUB_CACHE_DIR set), "
        f"then either copy that cache folder here and set TFHUB_CACHE_DIR to it (now: {cache}), or set "
        f"backbones.{cfg.name}.handle to the unpacked SavedModel directory."
    )


def _first_line(err: Exception) -> str:
    """The first line of an error's message (at most 300 characters), for a one-line hint."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _saved_model_entry(model, cfg: BackboneConfig) -> Callable:
    """How to call it: a hub-style callable root, else Keras export's `.serve`, else serving_default.

    Each returned callable refers to `model` itself: were only a method kept, the loaded object and
    its variables would be garbage-collected ("referencing variables which have been deleted").
    """
    if callable(model):
        return lambda images: model(images)
    if hasattr(model, "serve"):
        return lambda images: model.serve(images)
    signatures = getattr(model, "signatures", {})
    if "serving_default" in signatures:
        signature = signatures["serving_default"]
        inputs = list(signature.structured_input_signature[1])
        if len(inputs) != 1:
            raise BackboneError(
                f"backbone {cfg.name!r}: serving_default takes {inputs}; need exactly one image input"
            )
        return lambda images: model.signatures["serving_default"](**{inputs[0]: images})
    raise BackboneError(
        f"backbone {cfg.name!r}: the SavedModel at {cfg.handle!r} is not callable and has no `serve` "
        "or serving_default signature; save it with a tf.function taking a (b, s, s, 3) float32 batch"
    )


def _as_features(output, cfg: BackboneConfig) -> tf.Tensor:
    """Pick the output tensor and make it (b, D) float32, spatial maps average-pooled; with output = "map",
    (b, T, C): a (b, h, w, C) map row by row, (b, T, C) patch tokens as they are."""
    if isinstance(output, dict):
        keys = sorted(output)
        key = cfg.output_key or (keys[0] if len(keys) == 1 else "")
        if key not in output:
            raise BackboneError(
                f"backbone {cfg.name!r} returns outputs {keys}; set backbones.{cfg.name}.output_key "
                f"to one of them (got {cfg.output_key!r})"
            )
        output = output[key]
    output = tf.cast(output, tf.float32)
    if cfg.output == "map":
        return _hub_tokens(output, cfg)
    if output.shape.rank == 4:
        return tf.reduce_mean(output, axis=[1, 2])
    if output.shape.rank != 2:
        raise BackboneError(f"backbone {cfg.name!r} returns shape {output.shape}; expected (batch, features)")
    return output


def _hub_tokens(output: tf.Tensor, cfg: BackboneConfig) -> tf.Tensor:
    if output.shape.rank == 4:
        return tf.reshape(output, [-1, output.shape[1] * output.shape[2], output.shape[3]])
    if output.shape.rank != 3:
        raise BackboneError(
            f'backbone {cfg.name!r} returns shape {output.shape}, no map of tokens; output = "map" needs a '
            f"(batch, h, w, C) feature map or (batch, tokens, C) patch tokens: pick that output with "
            f'backbones.{cfg.name}.output_key, or set output = "pooled"'
        )
    return output


def as_tokens(feature_maps) -> tf.Tensor:
    """A (b, h, w, C) feature map as (b, h * w, C) float32 tokens, row by row (cache/README.md)."""
    shape = feature_maps.shape
    return tf.cast(tf.reshape(feature_maps, [-1, shape[1] * shape[2], shape[3]]), tf.float32)


# --- keras.applications ------------------------------------------------------------------------------


def _load_keras(cfg: BackboneConfig, *, mixed_precision: bool):
    constructor = getattr(keras.applications, cfg.model, None)
    if not cfg.model[:1].isupper() or not callable(constructor):
        valid = sorted(n for n in dir(keras.applications) if n[:1].isupper())
        raise BackboneError(
            f"backbones.{cfg.name}.model = {cfg.model!r} is not a keras.applications model; valid: {', '.join(valid)}"
        )
    family = constructor.__module__.rsplit(".", 1)[-1]  # keras.src.applications.resnet_v2 -> resnet_v2
    weights = _keras_weights(cfg)
    try:
        with _dtype_policy("mixed_float16" if mixed_precision else None):
            model = constructor(
                include_top=False,
                weights=weights,
                input_shape=(cfg.image_size, cfg.image_size, 3),
                pooling="avg",
            )
    except Exception as err:  # download, file and shape failures all end here; say which and what to do
        raise BackboneError(_keras_help(cfg, err)) from None

    def call(images):
        return tf.cast(model(images, training=False), tf.float32)

    # The layer before the global average pooling sees the last convolutional feature map.
    maps = keras.Model(model.inputs, model.layers[-1].input)

    def feature_map(images):
        return maps(images, training=False)

    def pool(feature_maps):
        return tf.cast(tf.reduce_mean(feature_maps, axis=[1, 2]), tf.float32)

    resolved = {"loader": "keras.applications", "keras_family": family, "mixed_precision": mixed_precision}
    if cfg.output == "map":  # the map itself, as tokens; Grad-CAM still differentiates through it
        resolved["token_grid"] = [int(d) for d in maps.output.shape[1:3]]
        pool = as_tokens

        def call(images):
            return as_tokens(feature_map(images))

    return _Loaded(call, _spec(cfg, keras_family=family), resolved, feature_map, pool)


def _keras_weights(cfg: BackboneConfig) -> str | None:
    if cfg.weights == "none":
        return None
    if cfg.weights == "imagenet":
        return "imagenet"
    if not Path(cfg.weights).expanduser().is_file():
        raise BackboneError(
            f"backbones.{cfg.name}.weights = {cfg.weights!r}: no such file "
            '(use "imagenet", "none" for random init, or the path of a local weights file)'
        )
    return str(Path(cfg.weights).expanduser())


def _keras_help(cfg: BackboneConfig, err: Exception) -> str:
    detail = _first_line(err)
    message = f"backbone {cfg.name!r}: cannot build keras.applications.{cfg.model} ({type(err).__name__}: {detail})."
    if cfg.weights == "imagenet":
        message += (
            " ImageNet weights are downloaded once into ~/.keras/models/; offline, copy that file there, or "
            f'set backbones.{cfg.name}.weights to a local weights file (weights = "none" for random init).'
        )
    return message


@contextmanager
def _dtype_policy(name: str | None) -> Iterator[None]:
    """Keras applications take no dtype argument, so the global policy is set while building, then restored."""
    if name is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# --- random conv net ----------------------------------------------------------------------------------


def random_kernels(*, width: int, seed: int, in_channels: int = 1) -> list[np.ndarray]:
    """He-normal 3x3 kernels, widths width/4, width/2, width, drawn with numpy so any TF version agrees."""
    rng = np.random.default_rng(seed)
    widths = [max(1, width // 4), max(1, width // 2), width][-RANDOM_STAGES:]
    kernels, fan_in = [], in_channels
    for out in widths:
        kernels.append(rng.normal(0.0, np.sqrt(2.0 / (9 * fan_in)), (3, 3, fan_in, out)).astype(np.float32))
        fan_in = out
    return kernels


def grid_pooling_matrix(n: int, grid: int) -> np.ndarray:
    """(grid, n) averaging weights: cell i covers positions floor(i*n/grid) .. ceil((i+1)*n/grid) - 1.

    A matmul instead of an area resize, because XLA has no ResizeArea kernel.
    """
    weights = np.zeros((grid, n), np.float32)
    for i in range(grid):
        start, stop = (i * n) // grid, -((-(i + 1) * n) // grid)
        weights[i, start:stop] = 1.0 / (stop - start)
    return weights


def _load_random(cfg: BackboneConfig, *, mixed_precision: bool):
    compute = tf.float16 if mixed_precision else tf.float32
    kernels = [tf.constant(k, compute) for k in random_kernels(width=cfg.width, seed=cfg.seed)]

    def feature_map(images):
        x = tf.cast(images, compute)
        for kernel in kernels:
            x = tf.nn.relu(tf.nn.conv2d(x, kernel, strides=2, padding="SAME"))
        return x

    def pool(x):
        # Grid pooling rather than global pooling keeps where a finding is (heart, bases, apex).
        rows = tf.constant(grid_pooling_matrix(x.shape[1], cfg.grid))
        cols = tf.constant(grid_pooling_matrix(x.shape[2], cfg.grid))
        pooled = tf.einsum("ih,bhwc,jw->bijc", rows, tf.cast(x, tf.float32), cols)
        return tf.reshape(pooled, [-1, cfg.grid * cfg.grid * cfg.width])

    def call(images):
        return pool(feature_map(images))

    resolved = {"loader": "random", "stages": RANDOM_STAGES, "mixed_precision": mixed_precision}
    if cfg.output == "map":
        # The grid's cells are its tokens: the grid x grid x width map that the pooled vector flattens.
        grid_pool = pool
        resolved["token_grid"] = [cfg.grid, cfg.grid]

        def pool(x):
            return tf.reshape(grid_pool(x), [-1, cfg.grid * cfg.grid, cfg.width])

        def call(images):
            return pool(feature_map(images))

    # One gray channel: replicating it three times would only triple the first layer's work.
    return _Loaded(call, _spec(cfg, channels=1), resolved, feature_map, pool)


# --- pixels --------------------------------------------------------------------------------------------


def _load_pixels(cfg: BackboneConfig, *, mixed_precision: bool):
    if cfg.preprocess != "bytes":
        raise BackboneError(
            f'backbones.{cfg.name}: source = "pixels" stores 0..255 gray values; set preprocess = "bytes" '
            f"(got {cfg.preprocess!r})"
        )

    def call(images):
        return images[..., 0]  # "bytes" of uint8 pixels: whole numbers 0..255 already

    return _Loaded(call, _spec(cfg, channels=1), {"loader": "pixels", "mixed_precision": False})


# One loader per source in extract.settings.SOURCES: (config, mixed_precision) -> _Loaded.
LOADERS = {"hub": _load_hub, "keras": _load_keras, "random": _load_random, "pixels": _load_pixels}
