"""The project config: `cxr14.toml` parsed once into frozen dataclasses; unknown keys and wrong types fail."""

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.registry import FEATURE_DTYPES
from cxr14.errors import InputError, check_choice
from extract.registry import NORMALIZATIONS, POLICIES, RANDOM_STAGES, SOURCES, check_fractions
from heads.registry import CALIBRATIONS, FUSIONS, HEAD_KINDS, LOSSES, OPERATING_POINTS

# Default order as in Wang et al. 2017 and CheXNet.
LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


# train.batch_size = "auto": the largest power of two up to AUTO_BATCH that still gives an epoch
# MIN_STEPS steps, never below SMALLEST_AUTO_BATCH. Full-size data keeps 1024 (large batches keep a CPU
# busy with small heads); the 1,470 training images of the demo's sample get 128, 11 steps an epoch,
# where 1024 gave 2 steps and a worse head (fc test mean AUC 0.856 against 0.916).
AUTO_BATCH = 1024
SMALLEST_AUTO_BATCH = 32
MIN_STEPS = 10


def _range(default, *, low=None, high=None, below=None, choices=None, words=None):
    """A field with its allowed values, checked wherever the config is built or overridden; `words` are
    the strings a numeric field also takes (e.g. "auto")."""
    return field(
        default=default,
        metadata={"low": low, "high": high, "below": below, "choices": choices, "words": words},
    )


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    source: str = _range(dataclasses.MISSING, choices=tuple(SOURCES))
    image_size: int = _range(dataclasses.MISSING, low=8, high=2048)
    preprocess: str = _range(dataclasses.MISSING, choices=NORMALIZATIONS)
    handle: str = ""
    output_key: str = ""
    model: str = ""
    weights: str = "imagenet"
    seed: int = _range(0, low=0)
    width: int = _range(32, low=1, high=1024)
    grid: int = _range(4, low=1, high=16)

    def __post_init__(self):
        check_ranges(self, section=f"backbones.{self.name}")
        side = -(-self.image_size // 2**RANDOM_STAGES)  # the feature map the grid pools
        if self.source == "random" and self.grid > side:
            raise InputError(
                f"backbones.{self.name}.grid = {self.grid} is larger than the {side}x{side} feature map of "
                f"a {self.image_size}-pixel image; use a grid of at most {side}"
            )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExtractConfig:
    batch_size: int = _range(64, low=1, high=65536)
    shard_size: int = _range(1024, low=1)
    dtype: str = _range("float16", choices=FEATURE_DTYPES)
    mixed_precision: bool = False
    xla: bool = False
    views: int = _range(1, low=1, high=64)
    seed: int = _range(0, low=0)
    # Larger images are refused before decoding: a small PNG can decode to gigabytes.
    max_pixels: int = _range(25_000_000, low=1)

    def __post_init__(self):
        check_ranges(self, section="extract")


@dataclass(frozen=True)
class HeadConfig:
    kind: str
    units: tuple[int, ...] = (512, 256)
    dropout: float = _range(0.3, low=0.0, below=1.0)
    transition: int = _range(512, low=1)
    fusion: str = _range("add", choices=FUSIONS)
    filters: tuple[int, ...] = (32, 64, 128)
    l2: float = _range(0.0, low=0.0)
    directions: int = _range(16, low=0, high=256)

    def __post_init__(self):
        check_ranges(self, section=f"heads.{self.kind}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _range(30, low=1)
    batch_size: int | str = _range("auto", low=1, words=("auto",))
    lr: float = _range(1e-3, low=1e-12, high=10.0)
    seed: int = _range(0, low=0)
    loss: str = _range("bce", choices=LOSSES)
    focal_gamma: float = _range(2.0, low=0.0)
    patience: int = _range(6, low=1)
    min_delta: float = _range(5e-4, low=0.0, below=1.0)
    weight_decay: float = _range(1e-2, low=0.0, below=1.0)
    metadata: bool = False
    augment: bool = False
    bootstrap: int = _range(1000, low=0)
    steps_per_execution: int = _range(32, low=1)

    def __post_init__(self):
        check_ranges(self, section="train")

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


@dataclass(frozen=True)
class DecisionConfig:
    """How a run turns probabilities into calls; fitted on the validation split after training."""

    calibration: str = _range("platt", choices=CALIBRATIONS)
    operating_point: str = _range("youden", choices=OPERATING_POINTS)
    target: float = _range(0.9, low=0.0, high=1.0)
    bins: int = _range(10, low=2, high=100)

    def __post_init__(self):
        check_ranges(self, section="decision")


@dataclass(frozen=True)
class SplitConfig:
    policy: str = _range("auto", choices=POLICIES)
    seed: int = _range(0, low=0)
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    val_fraction: float = _range(0.1, low=0.0, below=1.0)
    frozen_dir: str = ""

    def __post_init__(self):
        check_ranges(self, section="split")


@dataclass(frozen=True)
class Config:
    path: Path
    data_dir: Path
    csv: str
    labels: tuple[str, ...]
    split: SplitConfig
    cache_dir: Path
    runs_dir: Path
    extract: ExtractConfig
    backbones: dict[str, BackboneConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    heads: dict[str, HeadConfig] = field(default_factory=dict)
    decision: DecisionConfig = field(default_factory=DecisionConfig)

    def backbone(self, name: str) -> BackboneConfig:
        """The backbone called `name`, or an error listing the configured ones."""
        if name not in self.backbones:
            raise InputError(
                f"{self.path}: no backbone named {name!r}; configured: {', '.join(self.backbones)} "
                f"(add a [backbones.{name}] table to use it)"
            )
        return self.backbones[name]

    def head(self, kind: str) -> HeadConfig:
        """The [heads.KIND] preset, or the defaults for a kind without a table."""
        check_choice(kind, HEAD_KINDS, what="head kind")
        return self.heads.get(kind) or HeadConfig(kind=kind)

    def as_dict(self) -> dict:
        """JSON-able snapshot, saved beside every run."""
        return _jsonable(dataclasses.asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def check_ranges(settings: Any, *, section: str) -> None:
    """An InputError naming the key when a field of `settings` (a config dataclass) is outside its
    allowed values; every config dataclass runs it when made, so overrides are checked like the TOML."""
    for f in dataclasses.fields(settings):
        value, rule = getattr(settings, f.name), f.metadata
        key = f"{section}.{f.name}"
        if isinstance(value, str) and rule.get("words") is not None and value not in rule["words"]:
            raise InputError(f"{key} = {value!r} must be a whole number or {' or '.join(rule['words'])}")
        if rule.get("choices") is not None:
            check_choice(value, rule["choices"], what=f"{key}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high, below = rule.get("low"), rule.get("high"), rule.get("below")
            if (low is not None and value < low) or (high is not None and value > high):
                raise InputError(
                    f"{key} = {value} is out of range [{low}, {high if high is not None else '∞'}]"
                )
            if below is not None and value >= below:
                raise InputError(f"{key} = {value} must be below {below}")
    for name in ("units", "filters"):
        sizes = getattr(settings, name, ())
        if any(size < 1 for size in sizes):
            raise InputError(f"{section}.{name} = {list(sizes)}: every size must be at least 1")


def _convert(value: Any, annotation: Any, *, key: str, path: Path) -> Any:
    """Check `value` against a dataclass field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, types.UnionType):
        kinds = typing.get_args(annotation)
        if isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise InputError(f"{path}: {key} must be {names}, got {type(value).__name__} {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise InputError(f"{path}: {key} must be a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(annotation)
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise InputError(f"{path}: {key} must have {len(item_types)} items, got {len(value)}")
        return tuple(
            _convert(v, t, key=f"{key}[{i}]", path=path)
            for i, (v, t) in enumerate(zip(value, item_types, strict=True))
        )
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise InputError(f"{path}: {key} must be an integer, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise InputError(f"{path}: {key} must be {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, table: dict, *, section: str, path: Path, fixed: dict | None = None) -> Any:
    """Make dataclass `cls` from a TOML table; unknown keys and wrong types name the key and the file."""
    fixed = fixed or {}
    if not isinstance(table, dict):
        raise InputError(f"{path}: [{section}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = sorted(set(table) - names)
    if unknown:
        raise InputError(
            f"{path}: unknown key {section}.{unknown[0]} (valid keys in [{section}]: {', '.join(sorted(names))})"
        )
    values = {k: _convert(v, hints[k], key=f"{section}.{k}", path=path) for k, v in table.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.name not in fixed
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InputError(f"{path}: [{section}] is missing required key {missing[0]!r}")
    try:
        return cls(**fixed, **values)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def _pop_table(raw: dict, key: str, *, path: Path) -> dict:
    table = raw.pop(key, {})
    if not isinstance(table, dict):
        raise InputError(f"{path}: {key} must be a table ([{key}])")
    return table


def _check_backbone(b: BackboneConfig, *, path: Path) -> None:
    section = f"backbones.{b.name}"
    if b.source == "hub" and not b.handle:
        raise InputError(f'{path}: {section}.handle is required when source = "hub"')
    if b.source == "keras" and not b.model:
        raise InputError(
            f'{path}: {section}.model (a keras.applications name) is required when source = "keras"'
        )


def read_toml(path: Path, *, what: str) -> dict:
    """A TOML file as a dict; a missing file or bad syntax is an InputError naming the file."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML: {err}") from None


def load_config(path: Path) -> Config:
    """Read and check a cxr14 TOML config; relative folders are taken from the config file's folder."""
    path = Path(path)
    raw = read_toml(path, what="config file (pass --config PATH)")
    base = path.resolve().parent
    data = _plain_table(raw, "data", {"dir": str, "csv": str, "labels": list}, path=path)
    paths = _plain_table(raw, "paths", {"cache_dir": str, "runs_dir": str}, path=path)
    split = _build(SplitConfig, _pop_table(raw, "split", path=path), section="split", path=path)
    extract = _build(ExtractConfig, _pop_table(raw, "extract", path=path), section="extract", path=path)
    train = _build(TrainConfig, _pop_table(raw, "train", path=path), section="train", path=path)
    decision = _build(DecisionConfig, _pop_table(raw, "decision", path=path), section="decision", path=path)
    backbones = {
        name: _build(BackboneConfig, table, section=f"backbones.{name}", path=path, fixed={"name": name})
        for name, table in _pop_table(raw, "backbones", path=path).items()
    }
    heads = {
        check_choice(kind, HEAD_KINDS, what=f"{path}: [heads.{kind}]"): _build(
            HeadConfig, table, section=f"heads.{kind}", path=path, fixed={"kind": kind}
        )
        for kind, table in _pop_table(raw, "heads", path=path).items()
    }
    if raw:
        raise InputError(
            f"{path}: unknown top-level key {sorted(raw)[0]!r} "
            "(valid: data, paths, split, extract, backbones, train, heads, decision)"
        )
    for backbone in backbones.values():
        _check_backbone(backbone, path=path)
    if split.frozen_dir:
        # Like every folder in the config, a relative frozen_dir is taken from the config file's folder.
        split = dataclasses.replace(split, frozen_dir=str(base / split.frozen_dir))
    check_fractions(split.fractions, what=f"{path}: split.fractions")
    return Config(
        path=path,
        data_dir=base / data.get("dir", "data"),
        csv=data.get("csv", "auto"),
        labels=_labels(data.get("labels", LABELS), path=path),
        split=split,
        cache_dir=base / paths.get("cache_dir", "features"),
        runs_dir=base / paths.get("runs_dir", "runs"),
        extract=extract,
        backbones=backbones,
        train=train,
        heads=heads,
        decision=decision,
    )


def _plain_table(raw: dict, section: str, keys: dict[str, type], *, path: Path) -> dict:
    """A table of plain values ([data], [paths]): only `keys`, each of its type."""
    table = _pop_table(raw, section, path=path)
    for key, value in table.items():
        if key not in keys:
            raise InputError(f"{path}: unknown key {section}.{key} (valid: {', '.join(keys)})")
        if not isinstance(value, keys[key]):
            raise InputError(f"{path}: {section}.{key} must be {keys[key].__name__}, got {value!r}")
    return table


def _labels(labels, *, path: Path) -> tuple[str, ...]:
    labels = tuple(labels)
    if not labels or any(not isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        raise InputError(f"{path}: data.labels must be a list of distinct label names")
    unknown = [x for x in labels if x not in LABELS]
    if unknown:
        raise InputError(
            f"{path}: data.labels has {unknown[0]!r}, not a ChestX-ray14 label ({', '.join(LABELS)})"
        )
    return labels


def override(settings: Any, **changes: Any) -> Any:
    """A copy of a config dataclass with command-line values (None keeps the config's), checked again."""
    return dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})


HEAD_FIELDS = tuple(f.name for f in dataclasses.fields(HeadConfig) if f.name != "kind")
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
DECISION_FIELDS = tuple(f.name for f in dataclasses.fields(DecisionConfig))


def with_training(config: Config, *, kind: str, **changes: Any) -> Config:
    """`config` with the head preset of `kind` and [train] changed (None keeps a value); each key goes to
    the table that holds it, and the result is checked like the TOML."""
    unknown = sorted(set(changes) - set(HEAD_FIELDS) - set(TRAIN_FIELDS))
    if unknown:
        raise InputError(f"unknown head or training setting {unknown[0]!r}")
    head = override(config.head(kind), **{k: v for k, v in changes.items() if k in HEAD_FIELDS})
    train = override(config.train, **{k: v for k, v in changes.items() if k in TRAIN_FIELDS})
    return dataclasses.replace(config, heads={**config.heads, kind: head}, train=train)
