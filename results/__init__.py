"""Results: metrics with patient-bootstrap intervals, calibration, operating points, baselines, expert
labels, the published numbers, and the tables and plots people read."""

from cxr14.tf_logging import quiet_tensorflow_start

# Before any module here imports TensorFlow or Keras: TensorFlow's start-up lines stay off (cxr14.tf_logging).
quiet_tensorflow_start()
