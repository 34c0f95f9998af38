"""cxr14.tf_logging: TensorFlow starts without its CUDA and oneDNN chatter; anything else still shows."""

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from cxr14 import tf_logging

ROOT = Path(__file__).resolve().parents[1]
CHATTER = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795684548.515688   26179 port.cc:153] oneDNN custom operations are on.
I0000 00:00:1795684548.516017   26179 cudart_stub.cc:31] Could not find cuda drivers on your machine.
W0000 00:00:1795684548.516017   26179 some.cc:1] a warning
"""


def test_only_the_start_up_chatter_is_dropped(monkeypatch):
    captured, shown = io.BytesIO((CHATTER + "a real problem\n").encode()), io.StringIO()
    monkeypatch.setattr(sys, "stderr", shown)
    tf_logging._replay(captured)
    assert shown.getvalue() == "a real problem\n"


def test_a_default_start_on_this_machine_prints_nothing():
    code = (
        "from cxr14.tf_logging import import_tensorflow\n"
        "tf = import_tensorflow()\n"
        "tf.config.list_physical_devices()\n"
        "print(int(tf.constant(1) + 1))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "2\n" and result.stderr == ""


# What a bare `import tensorflow` and its first op print on this CPU machine (TensorFlow 2.21): absl's
# notice, then per library "oneDNN custom operations are on", "Could not find cuda drivers", the
# cpu_feature_guard lines ("rebuild TensorFlow with the appropriate compiler flags") and
# "E0000 ... failed call to cuInit: ... UNKNOWN ERROR (303)".
START_UP_NOISE = (
    r"^[IWE]\d{4} \d\d:\d\d:\d\d",
    r"All log messages before absl::InitializeLog",
    r"oneDNN custom operations",
    r"cuda drivers|cuInit|cuda_platform|cudart",
    r"rebuild TensorFlow|cpu_feature_guard",
)


def test_importing_the_python_api_and_building_a_head_prints_no_start_up_lines():
    # As from a notebook: the API, then a head from a module that imports Keras at its top, then inference.
    code = (
        "import numpy as np\n"
        "from experiments.api import open_project\n"
        "from heads.models import build_head\n"
        "from heads.settings import HeadConfig\n"
        "from inference import heatmap\n"
        "head = HeadConfig(kind='fc', units=(4,))\n"
        "model = build_head(kind='fc', inputs={'a': (8,)}, n_labels=2, head=head, seed=0)\n"
        "print(model.predict({'a': np.zeros((3, 8), 'float32')}, verbose=0).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "(3, 2)\n"
    noise = [line for line in result.stderr.splitlines() if any(re.search(p, line) for p in START_UP_NOISE)]
    assert noise == []


def test_verbose_disarms_the_quiet_start(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [tf_logging._QuietStart(), *sys.meta_path])
    tf_logging.import_tensorflow(verbose=True)
    assert not any(isinstance(finder, tf_logging._QuietStart) for finder in sys.meta_path)


def test_a_sweep_hides_only_the_retracing_warnings():
    logger, seen = logging.getLogger("tensorflow"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with tf_logging.models_built_in_a_loop():
            logger.warning("5 out of the last 9 calls to <function f> triggered tf.function retracing.")
            logger.warning("something else")
        logger.warning("6 out of the last 9 calls to <function f> triggered tf.function retracing.")
    finally:
        logger.removeHandler(handler)
    assert seen == [
        "something else",
        "6 out of the last 9 calls to <function f> triggered tf.function retracing.",
    ]
