"""The project config: `cxr14.toml` parsed once into frozen dataclasses; unknown keys and wrong types fail."""

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.errors import InputError

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

BACKBONE_SOURCES = ("hub", "keras", "random", "pixels")
PREPROCESSING = ("unit", "keras", "standardize", "bytes")
SPLIT_POLICIES = ("auto", "official", "patient-random", "frozen")
HEAD_KINDS = ("linear", "fc", "ensemble", "cnn")
LOSSES = ("bce", "weighted", "focal")
FEATURE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    source: str
    image_size: int
    preprocess: str
    handle: str = ""
    output_key: str = ""
    model: str = ""
    weights: str = "imagenet"
    seed: int = 0
    width: int = 32
    grid: int = 4

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExtractConfig:
    batch_size: int = 64
    shard_size: int = 1024
    dtype: str = "float16"
    mixed_precision: bool = False
    xla: bool = False
    views: int = 1
    seed: int = 0


@dataclass(frozen=True)
class HeadConfig:
    kind: str
    units: tuple[int, ...] = (512, 256)
    dropout: float = 0.5
    transition: int = 512
    fusion: str = "add"
    filters: tuple[int, ...] = (32, 64, 128)
    l2: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0
    loss: str = "bce"
    focal_gamma: float = 2.0
    patience: int = 5
    lr_patience: int = 2
    lr_factor: float = 0.5
    metadata: bool = False
    augment: bool = False
    bootstrap: int = 1000
    steps_per_execution: int = 32


@dataclass(frozen=True)
class SplitConfig:
    policy: str = "auto"
    seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    val_fraction: float = 0.1
    frozen_dir: str = ""


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

    def backbone(self, name: str) -> BackboneConfig:
        """The backbone called `name`, or an error listing the configured ones."""
        if name not in self.backbones:
            raise InputError(
                f"{self.path}: no backbone named {name!r}; configured: {', '.join(self.backbones)} "
                f"(add a [backbones.{name}] table to use it)"
            )
        return self.backbones[name]

    def head(self, kind: str) -> HeadConfig:
        if kind not in self.heads:
            return HeadConfig(kind=_choice(kind, HEAD_KINDS, key="--head", path=self.path))
        return self.heads[kind]

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


def _choice(value: str, valid: tuple[str, ...], *, key: str, path: Path) -> str:
    if value not in valid:
        raise InputError(f"{path}: {key} = {value!r} is not one of: {', '.join(valid)}")
    return value


def _convert(value: Any, annotation: Any, *, key: str, path: Path) -> Any:
    """Check `value` against a dataclass field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
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
    return cls(**fixed, **values)


def _pop_table(raw: dict, key: str, *, path: Path) -> dict:
    table = raw.pop(key, {})
    if not isinstance(table, dict):
        raise InputError(f"{path}: {key} must be a table ([{key}])")
    return table


def _check_backbone(b: BackboneConfig, *, path: Path) -> None:
    section = f"backbones.{b.name}"
    _choice(b.source, BACKBONE_SOURCES, key=f"{section}.source", path=path)
    _choice(b.preprocess, PREPROCESSING, key=f"{section}.preprocess", path=path)
    if b.image_size < 8:
        raise InputError(f"{path}: {section}.image_size must be at least 8, got {b.image_size}")
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

    data = _pop_table(raw, "data", path=path)
    paths = _pop_table(raw, "paths", path=path)
    split = _build(SplitConfig, _pop_table(raw, "split", path=path), section="split", path=path)
    extract = _build(ExtractConfig, _pop_table(raw, "extract", path=path), section="extract", path=path)
    train = _build(TrainConfig, _pop_table(raw, "train", path=path), section="train", path=path)
    backbones = {
        name: _build(BackboneConfig, table, section=f"backbones.{name}", path=path, fixed={"name": name})
        for name, table in _pop_table(raw, "backbones", path=path).items()
    }
    heads = {
        kind: _build(HeadConfig, table, section=f"heads.{kind}", path=path, fixed={"kind": kind})
        for kind, table in _pop_table(raw, "heads", path=path).items()
    }
    if raw:
        raise InputError(
            f"{path}: unknown top-level key {sorted(raw)[0]!r} "
            "(valid: data, paths, split, extract, backbones, train, heads)"
        )
    data_keys = {"dir": str, "csv": str, "labels": list}
    paths_keys = {"cache_dir": str, "runs_dir": str}
    for section, table, keys in (("data", data, data_keys), ("paths", paths, paths_keys)):
        for key, value in table.items():
            if key not in keys:
                raise InputError(f"{path}: unknown key {section}.{key} (valid: {', '.join(keys)})")
            if not isinstance(value, keys[key]):
                raise InputError(f"{path}: {section}.{key} must be {keys[key].__name__}, got {value!r}")

    labels = tuple(data.get("labels", LABELS))
    if not labels or any(not isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        raise InputError(f"{path}: data.labels must be a list of distinct label names")
    unknown = [x for x in labels if x not in LABELS]
    if unknown:
        raise InputError(
            f"{path}: data.labels has {unknown[0]!r}, not a ChestX-ray14 label ({', '.join(LABELS)})"
        )

    _choice(split.policy, SPLIT_POLICIES, key="split.policy", path=path)
    _choice(extract.dtype, FEATURE_DTYPES, key="extract.dtype", path=path)
    _choice(train.loss, LOSSES, key="train.loss", path=path)
    for kind, head in heads.items():
        _choice(kind, HEAD_KINDS, key=f"heads.{kind}", path=path)
        _choice(head.fusion, ("add", "concat"), key=f"heads.{kind}.fusion", path=path)
    for backbone in backbones.values():
        _check_backbone(backbone, path=path)
    if split.frozen_dir:
        # Like every folder in the config, a relative frozen_dir is taken from the config file's folder.
        split = dataclasses.replace(split, frozen_dir=str(base / split.frozen_dir))
    if abs(sum(split.fractions) - 1.0) > 1e-6:
        raise InputError(f"{path}: split.fractions must add up to 1, got {list(split.fractions)}")

    return Config(
        path=path,
        data_dir=base / data.get("dir", "data"),
        csv=data.get("csv", "auto"),
        labels=labels,
        split=split,
        cache_dir=base / paths.get("cache_dir", "features"),
        runs_dir=base / paths.get("runs_dir", "runs"),
        extract=extract,
        backbones=backbones,
        train=train,
        heads=heads,
    )


def with_overrides(config: Config, **changes: Any) -> Config:
    """A copy with command-line overrides (None means keep the config's value)."""
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
