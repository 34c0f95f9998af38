"""Heads from the user's own file: "PATH.py:FUNCTION", a function that builds logits from the inputs.

    def gated_mix(inputs: dict[str, keras.KerasTensor], *, n_labels: int, **options) -> keras.KerasTensor

`inputs` holds one tensor per backbone (standardized as built-in feature heads see them) plus "metadata"
when the run takes it; the function returns logits of shape (batch, n_labels). heads/models.py puts them
beside the probe's. A run keeps a copy of the file (HEAD_CODE) and its hash; everything that loads the
run later runs that copy, never the file as it is now. Anything wrong with the file or the function is
one InputError naming both. Light to import: TensorFlow loads only when a head is built or loaded.
"""

import hashlib
import inspect
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from cxr14.errors import InputError
from heads.settings import FILE_HEAD

HEAD_CODE = "head_code.py"  # the run folder's copy of the head's file
TRUST_HINT = "pass --trust-head-code, or --head-code FILE to check the copy against a file you trust"


@dataclass(frozen=True)
class Builder:
    path: Path
    function: str

    def __str__(self) -> str:
        return f"{self.path}:{self.function}"


def parse_builder(builder: str) -> Builder:
    """The file and function of "PATH.py:FUNCTION", or an InputError showing the form."""
    match = FILE_HEAD.fullmatch(builder)
    if match is None:
        raise InputError(
            f"head {builder!r}: a head from a file is named PATH.py:FUNCTION, e.g. my_heads.py:gated_mix"
        )
    return Builder(Path(match["file"]), match["function"])


def check_builder_file(builder: str) -> Builder:
    """The builder, once its file is known to exist (checked when a run is planned, before any work)."""
    where = parse_builder(builder)
    if not where.path.is_file():
        raise InputError(f"{where}: no file {where.path} (from {Path.cwd()}); check the path before the ':'")
    return where


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_module(path: Path, *, shown: str) -> types.ModuleType:
    """Run a head file as a module of its own (named after its hash, so two versions never mix)."""
    source = Path(path).read_bytes()
    name = f"cxr14_head_{hashlib.sha256(source).hexdigest()[:16]}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses and pickling look a class's module up here
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - running it is the point
    except Exception as err:  # noqa: BLE001 - whatever the file raises, it is the file's error
        sys.modules.pop(name, None)
        raise InputError(f"{shown}: the file fails to load: {_one_line(err)}") from None
    return module


def head_function(builder: str):
    """The builder function the user named, from their file as it is now."""
    where = check_builder_file(builder)
    module = load_module(where.path, shown=str(where))
    function = getattr(module, where.function, None)
    if not callable(function):
        found = [
            n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__
        ]
        raise InputError(
            f"{where}: {where.path} has no function {where.function!r} (functions there: {', '.join(found) or 'none'})"
        )
    return function


def file_head_logits(builder: str, inputs: dict, *, n_labels: int, options: dict):
    """The user's logits over `inputs`, checked: options it takes, no raise, shape (batch, n_labels)."""
    import keras

    function = head_function(builder)
    _check_options(function, builder=builder, options=options)
    try:
        logits = function(dict(inputs), n_labels=n_labels, **options)
    except Exception as err:  # noqa: BLE001 - the user's code may raise anything; report it in one line
        raise InputError(f"{builder}: raised while building the head: {_one_line(err)}") from None
    if not isinstance(logits, keras.KerasTensor):
        raise InputError(
            f"{builder}: returned {type(logits).__name__}, expected a Keras tensor of logits (batch, {n_labels})"
        )
    if len(logits.shape) != 2 or logits.shape[1] != n_labels:
        got = ", ".join("batch" if d is None else str(d) for d in logits.shape)
        raise InputError(f"{builder}: returned logits of shape ({got}); expected (batch, {n_labels})")
    return logits


def _check_options(function, *, builder: str, options: dict) -> None:
    """Refuse options the function does not take, or a required one left out, before calling it."""
    parameters = inspect.signature(function).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    named = {n for n, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    if "n_labels" not in named and not takes_any:
        raise InputError(f"{builder}: must take n_labels as a keyword: def f(inputs, *, n_labels, **options)")
    unknown = sorted(set(options) - named - {"n_labels"}) if not takes_any else []
    if unknown:
        accepted = sorted(named - {"n_labels"} - set(list(parameters)[:1]))
        raise InputError(
            f"{builder}: does not accept option {unknown[0]!r} (its options: {', '.join(accepted) or 'none'})"
        )
    required = [
        n
        for n, p in parameters.items()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty and n != "n_labels"
    ]
    missing = [n for n in required if n not in options]
    if missing:
        raise InputError(
            f"{builder}: needs option {missing[0]!r} (set it with --head-option {missing[0]}=VALUE)"
        )


def keep_head_code(builder: str, run_dir: Path) -> dict:
    """Copy the head's file into run_dir as HEAD_CODE; the record config.json keeps of it."""
    where = check_builder_file(builder)
    shutil.copyfile(where.path, Path(run_dir) / HEAD_CODE)
    return {
        "builder": str(where),
        "file": str(where.path.resolve()),
        "function": where.function,
        "copy": HEAD_CODE,
        "sha256": file_sha256(Path(run_dir) / HEAD_CODE),
    }


def kept_builder(run_dir: Path, record: dict) -> str:
    """The run's own copy as a builder, once its hash is the one recorded at training."""
    copy = Path(run_dir) / record["copy"]
    if not copy.is_file():
        raise InputError(f"{run_dir}: its head's code {copy} is missing; the run cannot load without it")
    if file_sha256(copy) != record["sha256"]:
        raise InputError(
            f"{copy} was changed after training (its sha256 is not the recorded one); train the run again"
        )
    return f"{copy}:{record['function']}"


def head_objects(run_dir: Path, record: dict) -> dict:
    """The Keras classes and functions defined in the run's copy, by class and registered name, for
    keras.saving.load_model's custom_objects: the copy's layers, never the file's current ones."""
    import keras

    where = parse_builder(kept_builder(run_dir, record))
    module = load_module(where.path, shown=f"{where} (the run's copy of {record['builder']})")
    objects = {}
    for value in vars(module).values():
        if getattr(value, "__module__", None) != module.__name__ or not callable(value):
            continue
        objects[value.__name__] = value
        objects[keras.saving.get_registered_name(value)] = value
    return objects


def check_head_trust(run_dir: Path, record: dict | None, *, trusted: bool, named: Path | None) -> None:
    """Refuse to load a run whose head is code from a file, unless trusted or its copy matches `named`."""
    if record is None or trusted:
        return
    copy = Path(run_dir) / record["copy"]
    if named is None:
        raise InputError(
            f"{run_dir}: its head is code from {record['builder']} (kept as {copy}), and loading it runs "
            f"that code; {TRUST_HINT}"
        )
    if not Path(named).is_file():
        raise InputError(f"--head-code {named}: no such file")
    if file_sha256(named) != record["sha256"]:
        raise InputError(
            f"{named} is not the head code {run_dir} was trained with (sha256 differs from {copy}'s); "
            "pass --trust-head-code to load the run's copy anyway"
        )


def _one_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    where = ""
    if isinstance(err, SyntaxError) and err.lineno:
        where = f" (line {err.lineno})"
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}{where}"
