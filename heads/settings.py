"""What stage two accepts by name and its settings: head kinds, fusions and losses, the [heads.KIND] and
[train] tables. The one list of each.

Kept free of TensorFlow so that the config and the command line check names at once; heads/models.py
builds each kind from its trunk and heads/losses.py makes each loss.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr14.errors import check_choice
from cxr14.settings import MAX_LAYER_SIZE, SEED_MAX, allowed, check_ranges


@dataclass(frozen=True)
class HeadKind:
    """A head: a trunk over its inputs, optional fully-connected layers, one sigmoid per label."""

    name: str
    summary: str
    # heads.models.TRUNKS key: "join" (concatenate), "fuse" (transition + add), "conv", and over token maps
    # (caches of a backbone with output = "map") "attention" and "attentive"
    trunk: str
    takes: str  # what its caches hold: "features" or "pixels"
    min_backbones: int = 1
    max_backbones: int | None = 1
    hidden: bool = True  # the fully-connected block (units, dropout) before the outputs
    options: tuple[str, ...] = ("units", "dropout")  # head settings it reads (descriptions, names)
    directions: bool = False  # looks for second-order signal (heads/directions.py) to start units on


def _token_kind(name: str, summary: str) -> HeadKind:
    """A head over token maps (caches of backbones with output = "map"), its trunk named as it is: one map,
    or several, each weighed by its own attention, then fused as the ensemble fuses pooled features."""
    options = ("transition", "fusion", "units", "dropout")
    return HeadKind(name, summary, trunk=name, takes="features", max_backbones=None, options=options)


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
        _token_kind(
            "attention",
            "gated-attention pooling over a token map (Ilse et al. 2018), then fully-connected layers",
        ),
        _token_kind(
            "attentive", "an attentive probe: one cross-attention block, a learned query over a token map"
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
# Where a feature head starts (heads/start.py): as the ridge probe, learning what it gets wrong, or from
# its own seeded random layers alone (the blog's way; the probe is still the reference beside it).
STARTS = ("probe", "none")


def head_kind(name: str, *, what: str = "head") -> HeadKind:
    """The kind called `name`, or an InputError listing the kinds."""
    return HEAD_KINDS[check_choice(name, HEAD_KINDS, what=what)]


# A head from the user's own file: "PATH.py:FUNCTION" (heads/custom.py loads it).
FILE_HEAD = re.compile(r"(?P<file>.+\.py):(?P<function>[A-Za-z_][A-Za-z0-9_]*)")


def is_file_head(name: str) -> bool:
    """Whether `name` names a head function in a file ("my_heads.py:gated_mix") rather than a kind."""
    return FILE_HEAD.fullmatch(name) is not None


def file_head_kind(builder: str) -> HeadKind:
    """The kind of a head from a file: any number of feature caches in, its own layers trained from the
    probe's start (no fully-connected block of ours, no second-order directions)."""
    return HeadKind(
        builder,
        "a head function from your own file",
        trunk="file",
        takes="features",
        max_backbones=None,
        options=(),
    )


def kind_of(head: "HeadConfig") -> HeadKind:
    """What `head` is: its builder's kind when it comes from a file, else the registered kind."""
    return file_head_kind(head.builder) if head.builder else head_kind(head.kind)


def describe_settings(head: dict, train: dict) -> list[str]:
    """`key=value` for what sets a run apart, only what its kind uses: the start, its head options, then
    the training choices (a linear head started at the probe is closed-form: no loss, lr or batch)."""
    kind = HEAD_KINDS.get(head.get("kind", ""))
    features = head.get("builder") or (kind is not None and kind.takes == "features")
    start = train.get("start", "probe")
    closed_form = kind is not None and not kind.hidden and not head.get("builder") and start == "probe"
    parts = [f"start={start}"] if features else []
    parts += [flag for flag in ("metadata", "augment") if train.get(flag)]
    if closed_form:
        return parts
    parts.append(f"loss={train.get('loss', 'bce')}")
    if train.get("loss") == "focal":
        parts.append(f"gamma={train.get('focal_gamma')}")
    if head.get("builder"):
        parts.append(f"builder={head['builder']}")
        parts += [f"{key}={value}" for key, value in (head.get("options") or {}).items()]
    for option in kind.options if kind and not head.get("builder") else ():
        value = head.get(option)
        parts.append(f"{option}={'-'.join(map(str, value)) if isinstance(value, list | tuple) else value}")
    if head.get("l2"):
        parts.append(f"l2={head['l2']}")
    parts += [f"{key}={train[key]}" for key in ("lr", "batch_size", "seed") if key in train]
    return parts


# train.batch_size = "auto": the largest power of two up to AUTO_BATCH that still gives an epoch
# MIN_STEPS steps, never below SMALLEST_AUTO_BATCH. Full-size data keeps 1024 (large batches keep a CPU
# busy with small heads); the 1,470 training images of the demo's sample get 128, 11 steps an epoch,
# where 1024 gave 2 steps and a worse head (fc test mean AUC 0.856 against 0.916).
AUTO_BATCH = 1024
# Resamples past this cost hours per run for no visible change in an interval (1,000 is the default).
MAX_BOOTSTRAP = 100_000
SMALLEST_AUTO_BATCH = 32
MIN_STEPS = 10


@dataclass(frozen=True)
class HeadConfig:
    kind: str
    units: tuple[int, ...] = (512, 256)
    dropout: float = allowed(0.3, low=0.0, below=1.0)
    transition: int = allowed(512, low=1, high=MAX_LAYER_SIZE)
    fusion: str = allowed("add", choices=FUSIONS)
    filters: tuple[int, ...] = (32, 64, 128)
    l2: float = allowed(0.0, low=0.0)
    directions: int = allowed(16, low=0, high=256)
    # A head from the user's own file: "PATH.py:FUNCTION" and the keyword options it is called with.
    builder: str = ""
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        check_ranges(self, section=f"heads.{self.kind}")


TOKEN_MEMORY_GB = 16.0  # [train] token_memory_gb: the largest token cache loaded whole


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = allowed(30, low=1)
    batch_size: int | str = allowed("auto", low=1, words=("auto",))
    lr: float = allowed(1e-3, low=1e-12, high=10.0)
    seed: int = allowed(0, low=0, high=SEED_MAX)
    loss: str = allowed("bce", choices=LOSSES)
    start: str = allowed("probe", choices=STARTS)
    focal_gamma: float = allowed(2.0, low=0.0)
    patience: int = allowed(6, low=1)
    min_delta: float = allowed(5e-4, low=0.0, below=1.0)
    weight_decay: float = allowed(1e-2, low=0.0, below=1.0)
    metadata: bool = False
    augment: bool = False
    bootstrap: int = allowed(1000, low=0, high=MAX_BOOTSTRAP)
    # Token caches (output = "map") are loaded whole: one larger than this many GB is refused, not swapped.
    token_memory_gb: float = allowed(TOKEN_MEMORY_GB, low=0.001)
    steps_per_execution: int = allowed(32, low=1)
    tensorboard: str = ""  # a folder: each run's per-epoch scalars go to FOLDER/RUN (keras TensorBoard)

    def __post_init__(self):
        check_ranges(self, section="train")

    def logged_as(self, run: str) -> "TrainConfig":
        """This config with its TensorBoard folder (if any) narrowed to the run's own subfolder."""
        if not self.tensorboard:
            return self
        return dataclasses.replace(self, tensorboard=str(Path(self.tensorboard) / run))

    def sized_for(self, train_rows: int) -> "TrainConfig":
        """This config with an "auto" batch size made a number for `train_rows` training examples."""
        if self.batch_size != "auto":
            return self
        return dataclasses.replace(self, batch_size=auto_batch_size(train_rows))


def auto_batch_size(train_rows: int) -> int:
    """AUTO_BATCH, halved until an epoch of `train_rows` examples has MIN_STEPS steps (at least
    SMALLEST_AUTO_BATCH)."""
    batch = AUTO_BATCH
    while batch > SMALLEST_AUTO_BATCH and train_rows < MIN_STEPS * batch:
        batch //= 2
    return batch


# What a [heads.KIND] table and the head flags set; a file head's builder and options are set apart.
HEAD_FIELDS = tuple(
    f.name for f in dataclasses.fields(HeadConfig) if f.name not in ("kind", "builder", "options")
)
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def start_directions(head: HeadConfig, train: TrainConfig) -> int:
    """How many second-order directions fit_start looks for: the head's, where its kind starts units on
    them and it starts at the probe (from none there is no probe inside the head to add to)."""
    return head.directions if kind_of(head).directions and train.start == "probe" else 0
