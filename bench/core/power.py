"""What a paired comparison could have detected, and when "as good as" may be said.

* **Minimum detectable effect** (MDE) of the paired t-test: the true mean difference that
  ``n`` seeds with standard deviation ``sd`` of the per-seed differences detect with
  probability ``power`` at two-sided level ``alpha``. The test statistic is then
  noncentral t with ``n − 1`` degrees of freedom and noncentrality ``δ·√n/sd``; the MDE
  solves ``P(|T| > t_{1−α/2}) = power`` for δ (exactly, not the normal approximation).
  A family of ``m`` tests adjusted by Holm is bounded by Bonferroni's level ``α/m`` (Holm's
  first step): the MDE is given at that level, so it is what the adjusted test could
  detect for sure.
* **Equivalence** (two one-sided tests, TOST): a difference is within ``±margin`` when both
  one-sided tests reject at ``alpha``, i.e. the ``1 − 2α`` interval of the mean difference
  lies inside ``(−margin, margin)``. "Not distinguishable" (the difference test did not
  reject) is not "equivalent": only TOST with a declared margin says the latter.
"""

from __future__ import annotations

import functools
import math

POWER = 0.8
ALPHA = 0.05


def mde(sd: float, n: int, *, alpha: float = ALPHA, power: float = POWER, tests: int = 1) -> float:
    """The smallest true paired mean difference the two-sided t-test at ``alpha/tests``
    detects with probability ``power`` (NaN for n < 2 or no spread)."""
    if n < 2 or not math.isfinite(sd) or sd <= 0:
        return math.nan
    if not (0 < alpha < 1 and 0 < power < 1 and tests >= 1):
        raise ValueError(f"mde needs 0 < alpha < 1, 0 < power < 1 and tests >= 1, got {alpha}, {power}, {tests}")
    return _noncentrality(n, float(alpha) / int(tests), float(power)) * sd / math.sqrt(n)


@functools.lru_cache(maxsize=4096)
def _noncentrality(n: int, level: float, power: float) -> float:
    """The noncentrality at which the two-sided t-test at ``level`` with ``n − 1`` degrees
    of freedom has ``power`` (the MDE in units of sd/√n; cached: it depends on n and the
    levels only)."""
    from scipy import optimize

    dof = n - 1
    crit = _t_critical(level, dof)
    return float(optimize.brentq(lambda x: t_test_power(x, crit, dof) - power, 0.0, 4 * crit + 10.0, xtol=1e-10))


def _t_critical(level: float, dof: int) -> float:
    from scipy import stats as sstats

    return float(sstats.t.ppf(1 - level / 2, dof))


def t_test_power(nc: float, crit: float, dof: int) -> float:
    """``P(|T| > crit)`` for ``T`` noncentral t with ``dof`` degrees of freedom and
    noncentrality ``nc``: ``E_V[Φ(nc − crit·√(V/dof)) + Φ(−nc − crit·√(V/dof))]`` over
    ``V ~ χ²(dof)``, integrated numerically (scipy's ``nct`` is unstable at few degrees
    of freedom and large noncentrality)."""
    from scipy import integrate
    from scipy import stats as sstats

    def integrand(v: float) -> float:
        scale = crit * math.sqrt(v / dof)
        return (sstats.norm.cdf(nc - scale) + sstats.norm.cdf(-nc - scale)) * sstats.chi2.pdf(v, dof)

    hi = float(sstats.chi2.ppf(1 - 1e-12, dof))
    value, _ = integrate.quad(integrand, 0.0, hi, limit=200)
    return min(1.0, max(0.0, value))


def tost_p(mean: float, sd: float, n: int, margin: float) -> float:
    """The p-value of the two one-sided t-tests that the mean difference lies in ``(−margin, margin)``
    (NaN for n < 2; 0 or 1 where the differences have no spread)."""
    if n < 2 or not math.isfinite(mean) or not math.isfinite(sd):
        return math.nan
    if not (margin > 0 and math.isfinite(margin)):
        raise ValueError(f"the equivalence margin must be finite and > 0, got {margin}")
    if sd == 0:
        return 0.0 if abs(mean) < margin else 1.0
    from scipy import stats as sstats

    se = sd / math.sqrt(n)
    p_low = float(sstats.t.sf((mean + margin) / se, n - 1))  # H0: mean <= −margin
    p_high = float(sstats.t.cdf((mean - margin) / se, n - 1))  # H0: mean >= margin
    return max(p_low, p_high)
