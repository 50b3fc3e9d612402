"""Student-t intervals: the one interval every comparison of the suite prints (the gate's
ratios of medians, the loss verdicts' paired differences, the layer findings' slopes).

For ``n`` values with standard deviation ``sd`` the two-sided ``confidence`` interval of the
mean is ``mean ± t_{(1+confidence)/2, n-1} · sd / √n``; a regression slope uses its own
standard error and ``n − 2`` degrees of freedom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95


def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided critical value ``t_{(1+confidence)/2, dof}``."""
    if dof < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom, got {dof}")
    from scipy.stats import t as student_t  # (imported when used: the command line's --help needs no scipy)

    return float(student_t.ppf((1 + confidence) / 2, dof))


def t_half_width(sd, n: int, confidence: float = CONFIDENCE):
    """Half the width of the interval of a mean of ``n`` values with standard deviation
    ``sd`` (a number, or an array of them: one interval per entry)."""
    return t_quantile(n - 1, confidence) * sd / math.sqrt(n)


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided ``CONFIDENCE`` Student-t interval (NaN bounds for n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @classmethod
    def of(cls, values) -> "Interval":
        """The interval of the mean of ``values`` (a list or an array)."""
        import numpy as np

        x = np.asarray(values, dtype=float)
        n = len(x)
        if n == 0:
            return cls(math.nan, math.nan, math.nan, 0)
        mean = float(x.mean())
        if n < 2:
            return cls(mean, math.nan, math.nan, n)
        half = t_half_width(float(x.std(ddof=1)), n)
        return cls(mean, mean - half, mean + half, n)
