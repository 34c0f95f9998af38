"""Numbers for people: durations and sizes with their units, rounded to what matters; close names for
mistyped ones."""

import difflib
import math
from collections.abc import Iterable


def duration(seconds: float) -> str:
    """0.42 s, 12.3 s, 4 min 05 s, 1 h 02 min."""
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def count(n: int, noun: str) -> str:
    """1 shard, 2 shards, 1,000 images."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def megabytes(mb: float) -> str:
    """850 MB, 3.2 GB."""
    return f"{mb:,.0f} MB" if mb < 1000 else f"{mb / 1024:.1f} GB"


def probability(value: float, *, decimals: int = 3) -> str:
    """0.400, 0.99976, 0.000012: `decimals` places, more near 0 or 1, where two significant digits of the
    distance to the end (1 - 0.99976 = 0.00024) tell apart values that fixed places round alike (1.000)."""
    distance = min(abs(value), abs(1 - value))
    if 0 < distance < 10 ** (1 - decimals):
        decimals = min(12, 1 - math.floor(math.log10(distance)))
    return f"{value:.{decimals}f}"


def did_you_mean(word: str, names: Iterable[str]) -> str:
    """ "; did you mean 'fc'?" where `names` holds a close one (a near spelling, or one that begins the
    other: val for validation), else ""."""
    names = [str(name) for name in names]
    close = [
        n
        for n in names
        if n != word and min(len(n), len(word)) >= 3 and (n.startswith(word) or word.startswith(n))
    ]
    close += [n for n in difflib.get_close_matches(word, names, n=3, cutoff=0.6) if n not in close]
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(n) for n in close[:3]) + "?"
