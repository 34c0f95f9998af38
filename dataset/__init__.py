"""The data set: the ChestX-ray14 index and labels, patient-wise splits, the one image loader (PNG and
DICOM), and the synthetic sample maker. What every later step learns its data from."""

from cxr14.tf_logging import quiet_tensorflow_start

# Before any module here imports TensorFlow or Keras: TensorFlow's start-up lines stay off (cxr14.tf_logging).
quiet_tensorflow_start()
