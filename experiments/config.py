"""The project config: `cxr14.toml` parsed once into the frozen settings each folder declares, composed
here and only here; unknown keys and wrong types fail naming the key."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr14.errors import InputError, check_choice, check_file_name
from cxr14.settings import build_settings, jsonable, override, read_toml
from cxr14.text import did_you_mean
from dataset.settings import LABELS, SplitConfig, check_fractions
from extract.settings import BackboneConfig, ExtractConfig, check_backbone
from heads.settings import (
    FILE_HEAD,
    HEAD_FIELDS,
    HEAD_KINDS,
    TRAIN_FIELDS,
    HeadConfig,
    TrainConfig,
    is_file_head,
)
from results.settings import DecisionConfig


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
                f"(add a [backbones.{name}] table to use it){did_you_mean(name, self.backbones)}"
            )
        return self.backbones[name]

    def head(self, kind: str) -> HeadConfig:
        """The [heads.KIND] preset, a head from a file ("my_heads.py:gated_mix", named after its
        function), or the defaults for a kind without a table."""
        if kind in self.heads:
            return self.heads[kind]
        if is_file_head(kind):
            return HeadConfig(kind=FILE_HEAD.fullmatch(kind)["function"], builder=kind)
        own = [name for name, head in self.heads.items() if head.builder]
        check_choice(kind, [*HEAD_KINDS, *own], what="head kind (or PATH.py:FUNCTION for your own)")
        return HeadConfig(kind=kind)

    def as_dict(self) -> dict:
        """JSON-able snapshot, saved beside every run."""
        return jsonable(dataclasses.asdict(self))


def _pop_table(raw: dict, key: str, *, path: Path) -> dict:
    table = raw.pop(key, {})
    if not isinstance(table, dict):
        raise InputError(f"{path}: {key} must be a table ([{key}])")
    return table


def load_config(path: Path) -> Config:
    """Read and check a cxr14 TOML config; relative folders are taken from the config file's folder."""
    path = Path(path)
    raw = read_toml(path, what="config file (pass --config PATH)")
    base = path.resolve().parent
    data = _plain_table(raw, "data", {"dir": str, "csv": str, "labels": list}, path=path)
    paths = _plain_table(raw, "paths", {"cache_dir": str, "runs_dir": str}, path=path)
    tables = {key: _pop_table(raw, key, path=path) for key in ("split", "extract", "train", "decision")}
    split = build_settings(SplitConfig, tables["split"], section="split", path=path)
    extract = build_settings(ExtractConfig, tables["extract"], section="extract", path=path)
    train = build_settings(TrainConfig, tables["train"], section="train", path=path)
    decision = build_settings(DecisionConfig, tables["decision"], section="decision", path=path)
    backbones = _backbones(_pop_table(raw, "backbones", path=path), path=path)
    heads = _heads(_pop_table(raw, "heads", path=path), path=path)
    if raw:
        raise InputError(
            f"{path}: unknown top-level key {sorted(raw)[0]!r} "
            "(valid: data, paths, split, extract, backbones, train, heads, decision)"
        )
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


def _backbones(tables: dict, *, path: Path) -> dict[str, BackboneConfig]:
    for name in tables:
        # The name becomes the feature file's name, CACHE/NAME.h5: it must stay inside the cache folder.
        check_file_name(name, what=f"{path}: [backbones.{name}] name")
    backbones = {
        name: build_settings(
            BackboneConfig, table, section=f"backbones.{name}", path=path, fixed={"name": name}
        )
        for name, table in tables.items()
    }
    for backbone in backbones.values():
        check_backbone(backbone, path=path)
    return backbones


def _heads(tables: dict, *, path: Path) -> dict[str, HeadConfig]:
    heads = {}
    for kind, table in tables.items():
        if isinstance(table, dict) and "builder" in table:
            heads[kind] = _file_head_table(kind, dict(table), path=path)
            continue
        if kind not in HEAD_KINDS:
            raise InputError(
                f"{path}: [heads.{kind}] = {kind!r} is not one of: {', '.join(HEAD_KINDS)} "
                '(or give it a builder = "FILE.py:FUNCTION" for a head of your own)'
            )
        heads[kind] = build_settings(
            HeadConfig, table, section=f"heads.{kind}", path=path, fixed={"kind": kind}
        )
    return heads


def _file_head_table(name: str, table: dict, *, path: Path) -> HeadConfig:
    """[heads.NAME] with builder = "FILE.py:FUNCTION" (FILE from the config's folder); every other key is
    an option the function is called with."""
    builder = table.pop("builder")
    if name in HEAD_KINDS:
        raise InputError(f"{path}: [heads.{name}] is a built-in head; give your own head another name")
    if not isinstance(builder, str) or not is_file_head(builder):
        raise InputError(f'{path}: heads.{name}.builder must be "FILE.py:FUNCTION", got {builder!r}')
    match = FILE_HEAD.fullmatch(builder)
    builder = f"{path.resolve().parent / match['file']}:{match['function']}"
    return HeadConfig(kind=name, builder=builder, options=table)


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


def with_training(config: Config, *, kind: str, **changes: Any) -> Config:
    """`config` with the head preset of `kind` and [train] changed (None keeps a value); each key goes to
    the table that holds it, and the result is checked like the TOML."""
    options = changes.pop("options", None)
    unknown = sorted(set(changes) - set(HEAD_FIELDS) - set(TRAIN_FIELDS))
    if unknown:
        raise InputError(f"unknown head or training setting {unknown[0]!r}")
    head = override(config.head(kind), **{k: v for k, v in changes.items() if k in HEAD_FIELDS})
    if options:
        if not head.builder:
            raise InputError(
                f"head options ({', '.join(options)}) are for a head from your own file; the {kind} head "
                "takes its settings as flags (--units, --dropout, ...)"
            )
        head = dataclasses.replace(head, options={**head.options, **options})
    train = override(config.train, **{k: v for k, v in changes.items() if k in TRAIN_FIELDS})
    return dataclasses.replace(config, heads={**config.heads, kind: head}, train=train)
