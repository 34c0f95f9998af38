"""Rows are joined by image name, never by position: the one join both stages use."""

from collections.abc import Sequence

import numpy as np
import pandas as pd


def positions(names: Sequence[str], *, among: Sequence[str]) -> np.ndarray:
    """For each of `names`, its row in `among` (int64), or -1 where `among` lacks it."""
    found = pd.Index(np.asarray(among, dtype=object)).get_indexer(np.asarray(names, dtype=object))
    return found.astype(np.int64)
