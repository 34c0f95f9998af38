"""Stage two: heads trained on cached features, from the probe start to the best validation epoch, and
scored on a split."""

from cxr14.tf_logging import quiet_tensorflow_start

# Before any module here imports TensorFlow or Keras: TensorFlow's start-up lines stay off (cxr14.tf_logging).
quiet_tensorflow_start()
