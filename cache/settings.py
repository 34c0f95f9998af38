"""What the feature store accepts by name: the kinds of cached data and the dtypes each may be stored in.

Kept free of h5py and numpy so that the config and the command line check names at once; cache/store.py
reads and writes them (format: cache/README.md).
"""

# kind -> allowed dtypes: backbone features (one vector per image), tokens (a backbone's spatial feature
# map or patch tokens, T x C per image: the attention heads' input), or the preprocessed pixels themselves
# (the cnn head's input).
DTYPES = {"features": ("float16", "float32"), "tokens": ("float16", "float32"), "pixels": ("uint8",)}
FEATURE_DTYPES = DTYPES["features"]
# Per-image dimensions of each kind: a vector (D,), a token map (T, C), a square image (S, S).
ITEM_DIMS = {"features": 1, "tokens": 2, "pixels": 2}
