"""Stage two: heads trained on cached features, from the probe start to the best validation epoch, and
scored on a split."""
