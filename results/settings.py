"""What scoring accepts by name and its settings: calibrations, operating points and the [decision] table.
The one list of each.

Kept free of numpy so that the config and the command line check names at once; results/calibration.py
fits each calibration and results/operating.py chooses each operating point.
"""

import dataclasses
from dataclasses import dataclass

from cxr14.settings import allowed, check_ranges

# Fitted on the validation split after training.
CALIBRATIONS = ("platt", "isotonic", "temperature", "none")
OPERATING_POINTS = ("youden", "sensitivity", "specificity")


@dataclass(frozen=True)
class DecisionConfig:
    """How a run turns probabilities into calls; fitted on the validation split after training."""

    calibration: str = allowed("platt", choices=CALIBRATIONS)
    operating_point: str = allowed("youden", choices=OPERATING_POINTS)
    target: float = allowed(0.9, low=0.0, high=1.0)
    bins: int = allowed(10, low=2, high=100)

    def __post_init__(self):
        check_ranges(self, section="decision")


DECISION_FIELDS = tuple(f.name for f in dataclasses.fields(DecisionConfig))
