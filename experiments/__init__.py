"""What the commands run: the whole config composed, then one function per command (extract, train-head,
evaluate, sweep, demo) and the leaderboard over runs."""

from cxr14.tf_logging import quiet_tensorflow_start

# Before any module here imports TensorFlow or Keras: TensorFlow's start-up lines stay off (cxr14.tf_logging).
quiet_tensorflow_start()
