"""What stage one accepts by name: backbone sources, image normalisations and split policies. The one list
of each.

Kept free of TensorFlow, numpy and pandas so that the config and the command line check names at once;
extract/backbones.py loads each source, extract/pipeline.py applies each normalisation and
extract/splits.py applies each policy.
"""

from collections.abc import Sequence

from cxr14.errors import InputError

# Backbone source -> what its cache holds ("features" or "pixels").
SOURCES = {"hub": "features", "keras": "features", "random": "features", "pixels": "pixels"}
# "unit": [0, 1] (TF Hub); "keras": the family's preprocess_input; "standardize": per image; "bytes": 0..255.
NORMALIZATIONS = ("unit", "keras", "standardize", "bytes")
# The "random" backbone's stride-2 convolutions: its feature map is image_size / 2**RANDOM_STAGES a side.
RANDOM_STAGES = 3
# "auto": the official lists when present, else "patient-random"; "frozen": lists written earlier.
POLICIES = ("auto", "official", "patient-random", "frozen")


def check_fractions(fractions: Sequence[float], *, what: str = "split.fractions") -> tuple[float, ...]:
    """Three non-negative shares (train, val, test) that add up to 1, or an InputError naming `what`."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise InputError(f"{what} must be three non-negative numbers summing to 1, got {list(fractions)}")
    return fractions
