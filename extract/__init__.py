"""Stage one: images of the index through frozen backbones into the feature store."""
