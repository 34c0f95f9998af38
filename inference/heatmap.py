"""Heatmaps: where in a film a trained run's probability of a finding comes from.

Grad-CAM where every backbone of the run exposes its last convolutional feature map (keras.applications,
the offline random backbones); otherwise SmoothGrad, input gradients through the fused backbone(s) and
head (TF Hub feature vectors, the pixels backbone); for a token head (attention, attentive) on request its
own attention weights over the token map. The image goes through prediction's own pipeline, and the maps
come back in the original image's geometry.
"""

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from scipy import ndimage

from cxr14.caveats import caveat_lines, random_weight_backbones
from cxr14.errors import InputError, check_choice
from cxr14.text import probability
from dataset.image_loader import ImageError, normalize, read_gray01, to_pixels
from heads.models import token_attention
from heads.run_folder import read_config
from inference.settings import HEATMAP_METHODS
from inference.trained import TrainedRun, as_cached, head_probabilities

SMOOTHGRAD_SAMPLES = 16
# Noise sd as a share of the [0, 1] gray range: about a film's own grain, not SmoothGrad's usual 10-20%.
# Heads that standardize their inputs magnify features that barely vary in training, and coarse noise
# sets those off: on the sample, sd 0.1 put 0 of 161 peaks on the finding, sd 0.01 45 (chance: 15);
# a head trained from random initialisation pointed alike at either (0.48, 0.49).
SMOOTHGRAD_NOISE = 0.01
# Gaussian sd as a share of the input side: input gradients are speckled, and a speckle's peak is no
# place. In the sample's pointing game 1/16 did at least as well as 1/32 (two runs: 0.41 vs 0.41, 0.50 vs
# 0.43, heads trained from random initialisation).
SMOOTHGRAD_BLUR = 1 / 16
OVERLAY_ALPHA = 0.45
HEATMAP_CMAP = "jet"
PANEL_PIXELS = 512  # most pixels across one panel of the overlay PNG


@dataclass(frozen=True)
class Explanation:
    """Maps for some labels of one image: (k, H, W) float32 in [0, 1], 1 at each map's peak."""

    method: str
    labels: tuple[str, ...]
    maps: np.ndarray


def heatmap_method(run: TrainedRun, method: str = "auto") -> str:
    """The method `method` resolves to for this run; Grad-CAM needs every backbone's feature map."""
    check_choice(method, HEATMAP_METHODS, what="heatmap method")
    exposed = all(b.feature_map is not None for b in run.backbones.values())
    if method == "attention":
        _check_attention(run)
    if method == "gradcam" and not exposed:
        hidden = [name for name, b in run.backbones.items() if b.feature_map is None]
        raise InputError(
            f"Grad-CAM needs each backbone's last convolutional feature map, and {', '.join(hidden)} "
            "exposes none (a TF Hub feature vector or pixels); use the smoothgrad or auto method"
        )
    if method == "auto":
        return "gradcam" if exposed else "smoothgrad"
    return method


def explain(
    run: TrainedRun, gray01: np.ndarray, *, labels: Sequence[str], method: str = "auto", seed: int = 0
) -> Explanation:
    """Maps for `labels` of one decoded (H, W, 1) gray [0, 1] image; `seed` draws SmoothGrad's noise."""
    indices = [run.labels.index(label) for label in labels]
    method = heatmap_method(run, method)
    scores = logit_run(run)
    if method == "attention":
        per_backbone = [np.repeat(m[None], len(indices), axis=0) for m in _attention(run, gray01)]
    elif method == "gradcam":
        per_backbone = _gradcam(scores, gray01, indices=indices)
    else:
        per_backbone = _smoothgrad(scores, gray01, indices=indices, seed=seed)
    height, width = gray01.shape[:2]
    maps = sum(_to_image_geometry(m, height=height, width=width) for m in per_backbone)
    return Explanation(method=method, labels=tuple(labels), maps=_unit_peak(maps))


def logit_run(run: TrainedRun) -> TrainedRun:
    """The run with its head ending before the final sigmoid, so the maps follow each label's logit, as
    Grad-CAM and SmoothGrad score a class: a confident head's probability is 1.0 in float32, and has no
    gradient left (the demo's fc head gave flat maps for its surest findings)."""
    last = run.head.layers[-1]
    if getattr(last, "activation", None) is not keras.activations.sigmoid:
        return run  # not a head this project builds; its output itself is the score
    x = last.input
    logits = x if isinstance(last, keras.layers.Activation) else keras.ops.matmul(x, last.kernel) + last.bias
    return dataclasses.replace(run, head=keras.Model(run.head.input, logits))


def _cached(outputs: tf.Tensor, dtype: str) -> tf.Tensor:
    """as_cached's values with the gradient of the identity (rounding has none, or zero)."""
    return outputs + tf.stop_gradient(as_cached(outputs, dtype) - outputs)


def _gradcam(run: TrainedRun, gray01: np.ndarray, *, indices: list[int]) -> list[np.ndarray]:
    """Per backbone (k, h, w): ReLU of the logit's gradient x activation, summed over channels.

    The element-wise form of Grad-CAM (HiResCAM). Behind global average pooling (keras.applications) the
    gradient is the same at every place, so this is Grad-CAM itself; behind the offline backbones' grid
    pooling it keeps the place their features encode: averaging the gradients there, as Grad-CAM does,
    pointed at the demo's drawn findings less often (0.22 against 0.35; chance 0.09).
    """
    images = {name: normalize(_pixels(gray01, b.spec.size), b.spec) for name, b in run.backbones.items()}
    with tf.GradientTape(persistent=True) as tape:
        maps = {name: b.feature_map(images[name]) for name, b in run.backbones.items()}
        tape.watch(list(maps.values()))  # what comes after them is recorded; the backbone itself need not be
        features = {name: _cached(b.pool(maps[name]), run.dtypes[name]) for name, b in run.backbones.items()}
        scores = head_probabilities(run, features)[0]
        targets = [scores[i] for i in indices]
    out = []
    for name in run.backbones:
        cams = [
            tf.nn.relu(tf.reduce_sum(tape.gradient(t, maps[name]) * maps[name], axis=-1))[0] for t in targets
        ]
        out.append(np.stack([c.numpy() for c in cams]))
    return out


def _check_attention(run: TrainedRun) -> None:
    """The attention method needs a token head over square (or recorded) token grids."""
    for name, backbone in run.backbones.items():
        if token_attention(run.head, name) is None:
            raise InputError(
                f"--heatmap-method attention needs a head that weighs tokens (attention or attentive, on a "
                f'backbone with output = "map"); this run\'s head has no attention over {name!r}: use '
                "gradcam, smoothgrad or auto"
            )
        token_grid(backbone)


def token_grid(backbone) -> tuple[int, int]:
    """(h, w) of a token backbone's map: as extraction recorded it, else the square root of its tokens."""
    recorded = backbone.config.get("resolved", {}).get("token_grid")
    if recorded:
        return tuple(recorded)
    side = math.isqrt(backbone.tokens)
    if side * side != backbone.tokens:
        raise InputError(
            f"backbone {backbone.name!r} has {backbone.tokens} tokens, no square grid and none recorded "
            "(backbone_config.resolved.token_grid), so its attention has no place on the film; use gradcam "
            "or smoothgrad"
        )
    return side, side


def _attention(run: TrainedRun, gray01: np.ndarray) -> list[np.ndarray]:
    """Per backbone (h, w): the head's weight on each token, on the map's grid. One weighting serves every
    finding (the attention pools the tokens once, before the labels), so each label gets the same map."""
    features = {
        name: as_cached(b.net(normalize(_pixels(gray01, b.spec.size), b.spec)), run.dtypes[name])
        for name, b in run.backbones.items()
    }
    out = []
    for name, backbone in run.backbones.items():
        layer = token_attention(run.head, name)
        # The tokens as the layer sees them: the head's own path from its input `name` (standardized).
        given = keras.Model(run.head.get_layer(name).output, layer.input)(features[name])
        weights = keras.ops.convert_to_numpy(layer.token_weights(given))[0]
        out.append(weights.reshape(token_grid(backbone)).astype(np.float32))
    return out


def _smoothgrad(run: TrainedRun, gray01: np.ndarray, *, indices: list[int], seed: int) -> list[np.ndarray]:
    """Per backbone (k, s, s): mean |d logit / d pixels| over noisy copies of the pixels, blurred."""
    rng = np.random.default_rng(seed)
    noisy = {}
    for name, b in run.backbones.items():
        pixels = _pixels(gray01, b.spec.size)
        noise = rng.standard_normal((SMOOTHGRAD_SAMPLES, *pixels.shape[1:])).astype(np.float32)
        noisy[name] = pixels + tf.constant(255.0 * SMOOTHGRAD_NOISE * noise)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(list(noisy.values()))
        features = {
            name: _cached(b.net(normalize(noisy[name], b.spec)), run.dtypes[name])
            for name, b in run.backbones.items()
        }
        scores = head_probabilities(run, features)
        # Each noisy copy is its own example, so the gradient of the sum is each copy's own gradient.
        targets = [tf.reduce_sum(scores[:, i]) for i in indices]
    out = []
    for name, b in run.backbones.items():
        grads = [np.abs(tape.gradient(t, noisy[name]).numpy()).mean(axis=0)[..., 0] for t in targets]
        sigma = SMOOTHGRAD_BLUR * b.spec.size
        out.append(np.stack([ndimage.gaussian_filter(g, sigma) for g in grads]))
    return out


def _pixels(gray01: np.ndarray, size: int) -> tf.Tensor:
    """(1, s, s, 1) float32 0..255: the uint8 pixels prediction gives a backbone, as floats to differentiate
    (backbone.fn takes uint8, which has no gradient; backbone.net takes them normalised)."""
    return tf.cast(to_pixels(tf.constant(gray01), size), tf.float32)[None]


def _to_image_geometry(maps: np.ndarray, *, height: int, width: int) -> np.ndarray:
    """(k, h, w) maps of the square backbone input -> (k, H, W) over the original image."""
    # The pipeline squeezes the whole image into the square, so stretching back restores its geometry.
    stretched = tf.image.resize(tf.constant(maps, tf.float32)[..., None], (height, width), method="bilinear")
    return stretched.numpy()[..., 0]


def _unit_peak(maps: np.ndarray) -> np.ndarray:
    """Each map scaled to [0, 1] by its own peak (an all-zero map stays zero)."""
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    return (maps / np.where(peaks > 0, peaks, 1.0)[:, None, None]).astype(np.float32)


def peak(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) of a map's largest value, at the pixel's centre, in the image's pixel coordinates."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return col + 0.5, row + 0.5


def write_heatmaps(
    run: TrainedRun, results: list[dict], *, out_dir: Path, top: int, method: str = "auto"
) -> None:
    """For each answered image: the `top` findings' maps as .npy and one overlay PNG, paths into `results`.

    Files: OUT/<stem>.heatmap.png and OUT/<stem>.<Label>.npy ((H, W) float16 in [0, 1], the image's
    own pixels); a stem seen before in this call gets a "~2", "~3", ... suffix.
    """
    heatmap_method(run, method)  # refuse an impossible method before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    caveat = run_caveat(run)
    seen: dict[str, int] = {}
    for result in results:
        if result.get("error"):
            continue
        path = Path(result["image"])
        try:
            gray01 = read_gray01(path)
        except ImageError as err:  # changed since it was predicted
            result["error"] = err.reason
            continue
        probabilities = result["probabilities"]
        labels = sorted(probabilities, key=lambda label: -probabilities[label])[:top]
        explanation = explain(run, gray01, labels=labels, method=method)
        stem = _unique_stem(path.stem, seen)
        result["heatmap"] = str(out_dir / f"{stem}.heatmap.png")
        result["heatmap_maps"] = {}
        for label, heatmap in zip(labels, explanation.maps, strict=True):
            npy = out_dir / f"{stem}.{label}.npy"
            np.save(npy, heatmap.astype(np.float16))
            result["heatmap_maps"][label] = str(npy)
        draw_overlay(
            Path(result["heatmap"]),
            gray01=gray01,
            explanation=explanation,
            probabilities=[probabilities[label] for label in labels],
            title=path.name,
            caveat=caveat,
        )


def _unique_stem(stem: str, seen: dict[str, int]) -> str:
    seen[stem] = seen.get(stem, 0) + 1
    return stem if seen[stem] == 1 else f"{stem}~{seen[stem]}"


def run_caveat(run: TrainedRun) -> list[str]:
    """What a run's overlays must say first: a synthetic sample, random-weight backbones."""
    backbones = read_config(run.run_dir).get("backbones", {})
    return caveat_lines(synthetic=bool(run.notice), random_backbones=random_weight_backbones(backbones))


def draw_overlay(
    path: Path,
    *,
    gray01: np.ndarray,
    explanation: Explanation,
    probabilities: Sequence[float],
    title: str,
    caveat: Sequence[str] = (),
) -> Path:
    """overlay_figure as a PNG whose Title metadata is its heading, caveat first, so tools can read it."""
    figure = overlay_figure(
        gray01=gray01, explanation=explanation, probabilities=probabilities, title=title, caveat=caveat
    )
    FigureCanvasAgg(figure)
    heading = figure.get_suptitle().replace("\n", " / ")
    figure.savefig(path, dpi=figure.dpi, metadata={"Title": heading})
    return Path(path)


def overlay_figure(
    *,
    gray01: np.ndarray,
    explanation: Explanation,
    probabilities: Sequence[float],
    title: str,
    caveat: Sequence[str] = (),
) -> Figure:
    """The film, then one panel per label with its map over the film and its peak marked, and a colour
    bar for the maps; headed by the caveat lines (a synthetic sample, random-weight backbones)."""
    height, width = gray01.shape[:2]
    panels = 1 + len(explanation.labels)
    inches = 3.2
    dpi = max(40, min(PANEL_PIXELS, width) / inches)
    figure = Figure(
        figsize=(inches * panels + 0.8, inches * height / width + 0.5 + 0.2 * len(caveat)),
        dpi=dpi,
        layout="constrained",
    )
    axes = np.atleast_1d(figure.subplots(1, panels))
    extent = (0, width, height, 0)  # pixel edges: a map pixel sits on its image pixel
    for ax in axes:
        ax.imshow(gray01[..., 0], cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="antialiased")
        ax.set_axis_off()
    axes[0].set_title(title, fontsize=8)
    for ax, label, p, heatmap in zip(
        axes[1:], explanation.labels, probabilities, explanation.maps, strict=True
    ):
        ax.imshow(heatmap, cmap=HEATMAP_CMAP, alpha=OVERLAY_ALPHA, vmin=0, vmax=1, extent=extent)
        ax.plot(*peak(heatmap), marker="+", color="white", markersize=10, markeredgewidth=2)
        ax.set_title(f"{label} {probability(p, decimals=2)}", fontsize=8)
    if explanation.labels:
        # The scale itself, unblended: over the film each colour shows at OVERLAY_ALPHA.
        scale = ScalarMappable(norm=Normalize(0, 1), cmap=HEATMAP_CMAP)
        bar = figure.colorbar(scale, ax=list(axes[1:]), fraction=0.03, pad=0.02)
        bar.set_label("share of the map's peak", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    heading = f"{explanation.method}: where each finding's probability comes from"
    figure.suptitle("\n".join([*caveat, heading]), fontsize=8)
    return figure
