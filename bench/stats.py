"""Medians and spreads of timing samples.

Rules of this room: pure. A summary keeps every sample (rounded) so the JSON
can be re-analysed later; the spread is reported as min/max and the
interquartile range, because with 3-15 samples on a shared machine a standard
deviation says little.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def summary(samples: Sequence[float], digits: int = 6) -> dict[str, Any] | None:
    """Median, quartiles, min, max, n and the samples themselves; None when empty."""
    if not samples:
        return None
    data = sorted(samples)
    if len(data) >= 2:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    else:
        q1 = q3 = data[0]
    return {
        "median": round(statistics.median(data), digits),
        "p90": round(_percentile(data, 0.9), digits),
        "q1": round(q1, digits),
        "q3": round(q3, digits),
        "min": round(data[0], digits),
        "max": round(data[-1], digits),
        "n": len(data),
        "samples": [round(s, digits) for s in samples],
    }


def _percentile(data: Sequence[float], fraction: float) -> float:
    """Linear-interpolated percentile of sorted data."""
    if len(data) == 1:
        return data[0]
    pos = fraction * (len(data) - 1)
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def median(summ: dict[str, Any] | None) -> float | None:
    return None if summ is None else summ["median"]


def spread(summ: dict[str, Any] | None, scale: float = 1.0, unit: str = "") -> str:
    """`min-max (n=K)` for tables."""
    if summ is None:
        return "-"
    return (f"{summ['min'] * scale:.3g}-{summ['max'] * scale:.3g}{unit} "
            f"(n={summ['n']})")
