"""Fitted cost laws ``t = c · x^k``: extrapolate skipped shapes instead of leaving holes.

``x`` is the natural size variable of the algorithm (docs/initializers.md §8), declared as the cost
class of each initializer on the registry (``loram_ref.registry.CostClass``):
``m·n·min(m, n)`` for a full SVD, ``n²·(m+n)`` for input-space work, ``m·n`` for
everything whose cost is a fixed number of passes over ``W`` or a GEMM with a fixed rank. Two laws per initializer:

* the *descriptive* law: ``c`` and ``k`` by least squares in log-log space over the
  largest measured sizes; ``k`` near 1 says the measurements follow the nominal
  complexity, ``k < 1`` that per-call overhead still dominates;
* the *extrapolation* law: ``k = 1`` and ``c`` fitted at the largest measured size. The
  size variable makes the asymptotic cost linear, and a free exponent fitted where
  overhead or a noisy point bends the curve can mis-predict by orders of magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from loram_ref import INITIALIZERS, get_initializer


def size_variable(initializer: str, d_out: int, d_in: int) -> float:
    """The initializer's size variable ``x`` at ``d_out x d_in`` (its cost class on the registry)."""
    return get_initializer(initializer).cost.size(d_out, d_in)


def size_variable_name(initializer: str) -> str:
    return get_initializer(initializer).cost.name


@dataclass(frozen=True)
class CostLaw:
    coefficient: float
    exponent: float
    variable: str
    points: int
    r2: float

    def predict(self, x: float) -> float:
        return self.coefficient * x**self.exponent


def fit(points: Iterable[tuple[float, float]], variable: str = "m·n") -> CostLaw | None:
    """Fit ``t = c·x^k`` to ``(x, t)`` pairs. Needs two distinct sizes; one point gives
    a linear law through it (``k = 1``), which is what each algorithm's size variable
    is chosen to make true."""
    pts = [(math.log(x), math.log(t)) for x, t in points if x > 0 and t > 0]
    if not pts:
        return None
    xs = {p[0] for p in pts}
    if len(xs) == 1:
        lx, lt = pts[0][0], sum(p[1] for p in pts) / len(pts)
        return CostLaw(math.exp(lt - lx), 1.0, variable, len(pts), float("nan"))
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    k = sxy / sxx
    a = my - k * mx
    ss_tot = sum((p[1] - my) ** 2 for p in pts)
    ss_res = sum((p[1] - (a + k * p[0])) ** 2 for p in pts)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return CostLaw(math.exp(a), k, variable, n, r2)


#: Fit over the largest sizes only: small shapes are dominated by per-call overhead
#: (kernel launches, Python), which flattens the slope and under-predicts large shapes.
LARGEST_SIZES = 3


def fit_rows(rows: list[dict], initializer: str, metric: str = "median_s", largest: int = LARGEST_SIZES) -> CostLaw | None:
    """Fit one initializer's ok rows over its ``largest`` distinct sizes; the caller
    passes the rows of one family (``bench.core.identity.family``). An initializer this release
    does not register (results of another version) has no cost class, so no law."""
    if initializer not in INITIALIZERS:
        return None
    pts = [
        (size_variable(initializer, r["d_out"], r["d_in"]), r[metric])
        for r in rows
        if r.get("status") == "ok" and r.get("initializer") == initializer and r.get(metric)
    ]
    sizes = sorted({x for x, _ in pts})[-largest:]
    return fit([p for p in pts if p[0] in sizes], size_variable_name(initializer))
