"""How a number of a result is written for people: an AUC with its interval, a difference, and the one
spelling of a value that is undefined or missing. Every table, summary and leaderboard uses these."""

import math
from collections.abc import Sequence

UNDEFINED = "undefined"  # an AUC that has no value: a label with one class in the split
MISSING = "—"  # a value the results do not hold


def format_number(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_auc(auc: float | None, ci: Sequence[float | None] | None = None) -> str:
    """`0.812 [0.790, 0.833]`, or just the AUC when there is no interval; UNDEFINED when there is no AUC."""
    if auc is None or (isinstance(auc, float) and math.isnan(auc)):
        return UNDEFINED
    if not ci or ci[0] is None or ci[1] is None:
        return format_number(auc)
    return f"{auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def as_float(value: float | None) -> float:
    """A stored result as a float for sorting and plotting: None (undefined) becomes NaN."""
    return math.nan if value is None else float(value)


def format_difference(
    difference: float | None, ci: Sequence[float | None] | None = None, digits: int = 3
) -> str:
    """`+0.012 [-0.003, +0.027]`: a signed difference of AUCs and its interval; MISSING without one."""
    if difference is None or (isinstance(difference, float) and math.isnan(difference)):
        return MISSING
    text = f"{difference:+.{digits}f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
    return text


# What a run that started at the ridge probe and never left it is called, in every output.
KEPT_PROBE = "kept the probe: no epoch beat it beyond noise on validation"
KEPT_START = "kept its start, the probe with second-order units: no epoch beat it beyond noise on validation"
IS_PROBE = "is the probe: a linear head started at the probe is the closed-form probe itself"


def probe_note(details: dict) -> str:
    """KEPT_PROBE, IS_PROBE or KEPT_START for a run whose head is its probe start (with its second-order
    units for KEPT_START), "" otherwise; from metrics.json."""
    if details.get("kept_probe"):
        return IS_PROBE if details.get("head") == "linear" else KEPT_PROBE
    return KEPT_START if details.get("kept_start") else ""
