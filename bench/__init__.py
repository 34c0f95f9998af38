"""Measuring instruments: timing of extraction and heads, and planted problems for head quality."""

from cxr14.tf_logging import quiet_tensorflow_start

# Before any module here imports TensorFlow or Keras: TensorFlow's start-up lines stay off (cxr14.tf_logging).
quiet_tensorflow_start()
