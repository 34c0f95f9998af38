"""How a settings dataclass is made from a TOML table and checked: allowed values beside each field,
unknown keys and wrong types named. Each folder's own settings.py declares its dataclasses with these;
only experiments/config.py composes them into the whole config."""

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from cxr14.errors import InputError, check_choice

# numpy's and TensorFlow's seeds are 32-bit: a larger one fails deep inside training or a split.
SEED_MAX = 2**32 - 1
# Layer sizes past this are typing mistakes (a 10**9-unit layer asks for terabytes), refused at the edge.
MAX_LAYER_SIZE = 65_536
MAX_LAYERS = 16


def allowed(default, *, low=None, high=None, below=None, choices=None, words=None):
    """A field with its allowed values, checked wherever the config is built or overridden; `words` are
    the strings a numeric field also takes (e.g. "auto")."""
    return field(
        default=default,
        metadata={"low": low, "high": high, "below": below, "choices": choices, "words": words},
    )


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
        # NaN compares false with every bound, so it would pass them all; infinity has no use either.
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{key} = {value} must be a finite number")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high, below = rule.get("low"), rule.get("high"), rule.get("below")
            if (low is not None and value < low) or (high is not None and value > high):
                raise InputError(
                    f"{key} = {value} is out of range [{low}, {high if high is not None else '∞'}]"
                )
            if below is not None and value >= below:
                raise InputError(f"{key} = {value} must be below {below}")
    for name in ("units", "filters"):
        check_layer_sizes(getattr(settings, name, ()), key=f"{section}.{name}")


def check_layer_sizes(sizes, *, key: str) -> None:
    """Layer sizes between 1 and MAX_LAYER_SIZE, at most MAX_LAYERS of them, or an InputError naming `key`."""
    if any(size < 1 or size > MAX_LAYER_SIZE for size in sizes) or len(sizes) > MAX_LAYERS:
        raise InputError(
            f"{key} = {list(sizes)}: at most {MAX_LAYERS} sizes, each between 1 and {MAX_LAYER_SIZE:,}"
        )


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


def build_settings(cls: type, table: dict, *, section: str, path: Path, fixed: dict | None = None) -> Any:
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


def read_toml(path: Path, *, what: str) -> dict:
    """A TOML file as a dict; a missing file or bad syntax is an InputError naming the file."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; the {what} is a TOML file") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: {what} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise InputError(f"{path}: {what} cannot be read ({os.strerror(err.errno or 0).lower()})") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML: {err}") from None


def override(settings: Any, **changes: Any) -> Any:
    """A copy of a config dataclass with command-line values (None keeps the config's), checked again."""
    return dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})


def jsonable(value: Any) -> Any:
    """Settings as JSON types: tuples become lists and paths strings."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
