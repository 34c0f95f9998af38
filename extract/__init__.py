"""Stage one: images of the data set through frozen backbones into the feature store."""

from cxr14.tf_logging import quiet_tensorflow_start

# Before any module here imports TensorFlow or Keras: TensorFlow's start-up lines stay off (cxr14.tf_logging).
quiet_tensorflow_start()
