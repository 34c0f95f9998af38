"""What the data set accepts by name and its settings: the label names, split policies and the split
settings, and the image normalisations. The one list of each.

Kept free of TensorFlow, numpy and pandas so that the config and the command line check names at once;
dataset/splits.py applies each policy and dataset/image_loader.py each normalisation.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cxr14.errors import InputError
from cxr14.settings import SEED_MAX, allowed, check_ranges

# Default order as in Wang et al. 2017 and CheXNet.
LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
# "auto": the official lists when present, else "patient-random"; "frozen": lists written earlier.
POLICIES = ("auto", "official", "patient-random", "frozen")
# "unit": [0, 1] (TF Hub); "keras": the family's preprocess_input; "standardize": per image; "bytes": 0..255.
NORMALIZATIONS = ("unit", "keras", "standardize", "bytes")


@dataclass(frozen=True)
class SplitConfig:
    policy: str = allowed("auto", choices=POLICIES)
    seed: int = allowed(0, low=0, high=SEED_MAX)
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    val_fraction: float = allowed(0.1, low=0.0, below=1.0)
    frozen_dir: str = ""

    def __post_init__(self):
        check_ranges(self, section="split")


def check_fractions(fractions: Sequence[float], *, what: str = "split.fractions") -> tuple[float, ...]:
    """Three non-negative shares (train, val, test) that add up to 1, or an InputError naming `what`."""
    fractions = tuple(float(f) for f in fractions)
    # NaN passes every comparison, so finiteness is checked first.
    finite = all(math.isfinite(f) for f in fractions)
    if len(fractions) != 3 or not finite or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise InputError(f"{what} must be three non-negative numbers summing to 1, got {list(fractions)}")
    return fractions
