"""TensorFlow's own log lines, off unless asked for, whichever module imports it first.

On a CPU machine TensorFlow prints CUDA and oneDNN lines at start-up that read like failures
("E0000 ... failed call to cuInit ... UNKNOWN ERROR (303)", "Could not find cuda drivers") although
nothing is wrong. TF_CPP_MIN_LOG_LEVEL silences them once TensorFlow's logging is set up, but the lines
printed while its libraries load come before that (twice: two libraries, each with its own copy of
absl), so the import itself runs with standard error captured and only the unexpected lines replayed.

Every package that imports TensorFlow (or Keras, which imports it) calls quiet_tensorflow_start() in its
__init__.py, before any of its modules run: a notebook that imports heads.models, or the Python API, then
starts TensorFlow as quietly as run.py does. It only arms a one-time hook on the import of
"tensorflow"; nothing is imported until a module asks for it, so `run.py --help` stays instant.
"""

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

# absl INFO and WARNING lines ("I0000 00:00:1795684548.515688   26179 port.cc:153] ..."), and absl's notice
# that lines before its set-up go to standard error.
_CHATTER = re.compile(r"^([IW]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog)")


def quiet_tensorflow_start() -> None:
    """Arrange for the first `import tensorflow` in this process to run without its start-up lines,
    unless TensorFlow is already imported or the user set TF_CPP_MIN_LOG_LEVEL (then it logs as usual)."""
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietStart) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietStart())


def import_tensorflow(*, verbose: bool = False) -> ModuleType:
    """TensorFlow, imported with its C++ and absl log lines off unless `verbose` or the user set
    TF_CPP_MIN_LOG_LEVEL (then TensorFlow logs as usual)."""
    if verbose:
        _disarm()
    else:
        quiet_tensorflow_start()
    import tensorflow as tf

    return tf


def _disarm() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietStart)]


class _QuietStart(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands TensorFlow's own spec back with a loader that runs it quietly."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        _disarm()  # once: later imports are plain, and find_spec below does not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # TensorFlow sees its own loader
        # 3: no C++ INFO, WARNING or ERROR lines once logging is up; failures still raise Python errors.
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        with tempfile.TemporaryFile(mode="w+b") as captured:
            saved = _redirect_stderr(captured)
            try:
                self.loader.exec_module(module)
            finally:
                _restore_stderr(saved)
                _replay(captured)
        _quiet_absl()


def _redirect_stderr(target) -> int:
    """Point file descriptor 2 (C++ and Python alike) at `target`; returns a copy of the old one."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(target.fileno(), 2)
    return saved


def _restore_stderr(saved: int) -> None:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def _replay(captured) -> None:
    """Everything captured but the known start-up chatter, so a real problem still shows."""
    captured.seek(0)
    for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
        if not _CHATTER.match(line):
            sys.stderr.write(line)
    sys.stderr.flush()


def _quiet_absl() -> None:
    """Keras logs some notices through absl ("WARNING:absl:..."); errors still show."""
    try:
        from absl import logging as absl_logging
    except ImportError:  # absl comes with TensorFlow; nothing to quiet without it
        return
    absl_logging.set_verbosity(absl_logging.ERROR)


class _NotRetracing(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def models_built_in_a_loop() -> Iterator[None]:
    """Without TensorFlow's "N out of the last M calls ... triggered tf.function retracing" warnings.

    A sweep builds a new head per trial, and each traces its own training and prediction functions once.
    TensorFlow counts traces by the function's code, not its instance, so from the fifth trial on it
    warns of excessive retracing although no function is traced twice for the same shapes.
    """
    logger, quiet = logging.getLogger("tensorflow"), _NotRetracing()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
