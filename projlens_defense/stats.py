"""Statistics of a benign null shared by the scan's calibration and the data-free repair."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["prediction_bound"]


def prediction_bound(values: Sequence[float], fpr: float) -> float:
    """One-sided Student-t prediction bound: a new draw from the benign values' distribution exceeds it
    with probability ``fpr`` (normal model, small-sample corrected); inf with fewer than 2 values."""
    from scipy.stats import t

    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if n < 2:
        return math.inf
    mean = sum(vals) / n
    sd = max(math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)), 1e-6)
    return mean + float(t.isf(fpr, n - 1)) * sd * math.sqrt(1 + 1 / n)
