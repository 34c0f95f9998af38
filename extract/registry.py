"""What stage one accepts by name: backbone sources and image normalisations. The one list of each.

Kept free of TensorFlow so that the config and the command line check names at once; extract/backbones.py
loads each source and extract/pipeline.py applies each normalisation.
"""

# Backbone source -> what its cache holds ("features" or "pixels").
SOURCES = {"hub": "features", "keras": "features", "random": "features", "pixels": "pixels"}
# "unit": [0, 1] (TF Hub); "keras": the family's preprocess_input; "standardize": per image; "bytes": 0..255.
NORMALIZATIONS = ("unit", "keras", "standardize", "bytes")
# The "random" backbone's stride-2 convolutions: its feature map is image_size / 2**RANDOM_STAGES a side.
RANDOM_STAGES = 3
