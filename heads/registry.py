"""What stage two accepts by name: head kinds, fusions, losses, calibrations, operating points and heatmap
methods. The one list of each.

Kept free of TensorFlow so that the config and the command line check names at once; heads/models.py
builds each kind from its trunk and heads/losses.py makes each loss.
"""

from dataclasses import dataclass

from cxr14.errors import check_choice


@dataclass(frozen=True)
class HeadKind:
    """A head: a trunk over its inputs, optional fully-connected layers, one sigmoid per label."""

    name: str
    summary: str
    trunk: str  # heads.models.TRUNKS key: "join" (concatenate), "fuse" (transition + add), "conv"
    takes: str  # what its caches hold: "features" or "pixels"
    min_backbones: int = 1
    max_backbones: int | None = 1
    hidden: bool = True  # the fully-connected block (units, dropout) before the outputs
    options: tuple[str, ...] = ("units", "dropout")  # head settings it reads (descriptions, names)
    directions: bool = False  # looks for second-order signal (heads/directions.py) to start units on


HEAD_KINDS = {
    kind.name: kind
    for kind in (
        HeadKind("linear", "a linear probe", trunk="join", takes="features", hidden=False, options=()),
        HeadKind(
            "fc",
            "two fully-connected layers (the blog's model 2)",
            trunk="join",
            takes="features",
            directions=True,
        ),
        HeadKind(
            "ensemble",
            "per-backbone transition layers, fused, then fully-connected layers (the blog's model 3)",
            trunk="fuse",
            takes="features",
            min_backbones=2,
            max_backbones=None,
            options=("transition", "fusion", "units", "dropout"),
        ),
        HeadKind(
            "cnn",
            "a small conv net on cached pixels (the blog's base case)",
            trunk="conv",
            takes="pixels",
            options=("filters", "units", "dropout"),
        ),
    )
}
FUSIONS = ("add", "concat")
LOSSES = ("bce", "weighted", "focal")
# Fitted on the validation split after training (heads/calibration.py, heads/operating.py).
CALIBRATIONS = ("platt", "isotonic", "temperature", "none")
OPERATING_POINTS = ("youden", "sensitivity", "specificity")
# heads/heatmap.py: "auto" is Grad-CAM where every backbone of a run exposes its feature map, else SmoothGrad.
HEATMAP_METHODS = ("auto", "gradcam", "smoothgrad")


def head_kind(name: str, *, what: str = "head") -> HeadKind:
    """The kind called `name`, or an InputError listing the kinds."""
    return HEAD_KINDS[check_choice(name, HEAD_KINDS, what=what)]


def describe_settings(head: dict, train: dict) -> list[str]:
    """`key=value` for what sets a run apart: its kind's head options, then the training choices."""
    parts = [f"loss={train.get('loss', 'bce')}"]
    if train.get("loss") == "focal":
        parts.append(f"gamma={train.get('focal_gamma')}")
    parts += [flag for flag in ("metadata", "augment") if train.get(flag)]
    kind = HEAD_KINDS.get(head.get("kind", ""))
    for option in kind.options if kind else ():
        value = head.get(option)
        parts.append(f"{option}={'-'.join(map(str, value)) if isinstance(value, list | tuple) else value}")
    if head.get("l2"):
        parts.append(f"l2={head['l2']}")
    parts += [f"{key}={train[key]}" for key in ("lr", "batch_size", "seed") if key in train]
    return parts
