"""Stage one: images of the data set through frozen backbones into the feature store."""
