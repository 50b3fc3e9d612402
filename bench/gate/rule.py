"""The regression gate's decision: from interleaved rounds of two revisions to a verdict.

A *round* is one worker process of each side, run back to back (the order alternates,
A B then B A, so the machine's drift between processes falls on both sides alike). Its
time ratio is ``median(new values) / median(base values)``: the two processes share
the machine's state of that moment, so the pair, not the single value, is the unit of
the sample (values of one process are not independent draws: they share its allocator,
caches and frequency, and the issue's A/A runs showed that treating them as independent
makes p-values far too small).

The gate decides in two stages (asv's ``continuous`` and its confirmation):

1. *Screen*: ``screen_rounds`` rounds per cell. Their estimate is the geometric mean of
   the round ratios; a cell whose estimate is beyond ``1 ± threshold`` (time), or whose
   median peak memory grew or shrank by more than ``memory_threshold`` and 1 MiB, is
   flagged.
2. *Confirm*: a flagged cell is measured again in ``confirm_rounds`` fresh rounds, after
   every cell has been screened (later in time, so that a passing disturbance does not
   flag both stages). It counts only when the fresh rounds alone flag it in the same
   direction: their estimate beyond ``1 ± threshold`` **and** their 95 % t-interval
   entirely beyond ``1 ± margin``.

The interval is what makes the rule fit every cell: on this 2-core machine a cell of a
few hundred microseconds varies by ±40 % from one process to the next (whole processes
run in a fast or a slow mode), a 20 ms cell by ±2-8 % when the machine is quiet and up
to ±30 % when it is busy. A fixed threshold alone would
either flag the noisy cells of an A/A run or miss 30 % in the quiet ones; the interval
lets a quiet cell confirm a 1.3x change in a few rounds while a noisy one cannot confirm
a change its rounds do not resolve. Each cell's *resolution* (the smallest slowdown its
confirming rounds could confirm, at the noise they measured) is reported with it.

Rounds, not values, are the sample: values of one process are not independent draws. What
justifies the rule is its measured error rates: ``loram-bench gate-error-rates`` replays
real A/A rounds (``bench.gate.rates``); docs/gate.md gives the false-alarm rate per run and
the power at a planted 1.3x slowdown for the defaults.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from bench.core.intervals import t_half_width
from bench.core.options import option
from bench.initcost.metrics import (  # noqa: F401
    FASTER,
    LESS_MEMORY,
    MEMORY_FLOOR_BYTES,
    MORE_MEMORY,
    NOT_CONFIRMED,
    NOT_GATED,
    REGRESSIONS,
    SAME,
    SLOWER,
    UNCHANGED,
    UNMEASURABLE,
)

#: Cells predicted to take longer than this per worker process are not gated (reported).
GATE_LIMIT_S = 10.0


@dataclass(frozen=True)
class GateRule:
    """How many rounds each stage takes and when a cell is flagged.

    The defaults are the ones whose error rates docs/gate.md reports (measured on the
    quick suite's init cells on a 2-core machine).
    """

    screen_rounds: int = option(3, help="rounds (one process per side, order alternating) every cell gets")
    confirm_rounds: int = option(8, help="fresh rounds a flagged cell gets; it counts only if they flag it again")
    threshold: float = option(0.15, help="flag a time ratio beyond 1 + this (or below 1/(1 + this))")
    memory_threshold: float = option(0.05, help="flag peak-memory growth beyond this fraction (and 1 MiB)")
    margin: float = option(0.10, help="confirming rounds' 95 %% interval must lie beyond 1 + this")

    def validate(self) -> None:
        for flag, value, low in (("--screen-rounds", self.screen_rounds, 1), ("--confirm-rounds", self.confirm_rounds, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
        for flag, value in (("--threshold", self.threshold), ("--memory-threshold", self.memory_threshold)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{flag} must be a finite number > 0 (a fraction, e.g. 0.10), got {value!r}")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and 0 <= self.margin <= self.threshold):
            raise ValueError(f"--margin must be a finite number in [0, --threshold {self.threshold}], got {self.margin!r}")


@dataclass(frozen=True)
class Pair:
    """One round: the raw values and peak memory of a base process and a new process."""

    base: Sequence[float]
    new: Sequence[float]
    base_peak: int | None = None
    new_peak: int | None = None

    @property
    def log_ratio(self) -> float:
        """``log(median(new) / median(base))``."""
        return math.log(statistics.median(self.new)) - math.log(statistics.median(self.base))


@dataclass(frozen=True)
class Estimate:
    """The time ratio NEW/BASE of one stage: the geometric mean over its rounds and its
    95 % t-interval (NaN with one round)."""

    ratio: float
    low: float
    high: float
    rounds: int

    def text(self) -> str:
        interval = f" [{self.low:.2f}, {self.high:.2f}]" if math.isfinite(self.low) else ""
        return f"x{self.ratio:.3f}{interval} over {self.rounds} round{'s' * (self.rounds != 1)}"


def estimate(pairs: Sequence[Pair]) -> Estimate:
    """Geometric mean of the round ratios, with a t-interval on the mean log ratio."""
    if not pairs:
        raise ValueError("estimate needs at least one round")
    logs = [p.log_ratio for p in pairs]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return Estimate(math.exp(mean), math.nan, math.nan, len(logs))
    half = t_half_width(statistics.stdev(logs), len(logs))
    return Estimate(math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs))


def time_call(est: Estimate, threshold: float, margin: float | None = None) -> str:
    """``slower`` beyond ``1 + threshold``, ``faster`` below ``1 / (1 + threshold)``; with
    a ``margin`` (the confirming stage), the 95 % interval must also lie beyond
    ``1 + margin`` (below ``1 / (1 + margin)``)."""
    if est.ratio > 1 + threshold and (margin is None or est.low > 1 + margin):
        return SLOWER
    if est.ratio < 1 / (1 + threshold) and (margin is None or est.high < 1 / (1 + margin)):
        return FASTER
    return SAME


def resolution(pairs: Sequence[Pair], rule: "GateRule") -> float:
    """The smallest slowdown the confirming stage would confirm at the noise these rounds
    show: ``confirm_rounds`` rounds with their spread put the interval's half-width at
    ``h = t · sd / √n`` (log scale), so the ratio must pass both ``1 + threshold`` and
    ``(1 + margin) · e^h``. NaN with fewer than two rounds."""
    if len(pairs) < 2:
        return math.nan
    sd = statistics.stdev(p.log_ratio for p in pairs)
    n = rule.confirm_rounds
    half = t_half_width(sd, n)
    return max(1 + rule.threshold, (1 + rule.margin) * math.exp(half))


def _median_peak(values: Sequence[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def memory_call(pairs: Sequence[Pair], threshold: float) -> tuple[str, float | None, float | None]:
    """``(call, base peak, new peak)``: the medians over rounds of each side's peak extra
    memory; growth (or shrinkage) beyond ``threshold`` of the base and 1 MiB is flagged."""
    base, new = _median_peak([p.base_peak for p in pairs]), _median_peak([p.new_peak for p in pairs])
    if base is None or new is None:
        return SAME, base, new
    margin = max(MEMORY_FLOOR_BYTES, threshold * base)
    if new - base > margin:
        return MORE_MEMORY, base, new
    if base - new > margin:
        return LESS_MEMORY, base, new
    return SAME, base, new


@dataclass(frozen=True)
class StageCall:
    """What one stage says about a cell."""

    time: str
    memory: str
    estimate: Estimate
    base_peak: float | None
    new_peak: float | None

    @property
    def flagged(self) -> bool:
        return self.time != SAME or self.memory != SAME


def judge(pairs: Sequence[Pair], rule: GateRule, confirming: bool = False) -> StageCall:
    """The call of one stage's rounds (the confirming stage also needs its interval past the margin)."""
    est = estimate(pairs)
    mem, base_peak, new_peak = memory_call(pairs, rule.memory_threshold)
    return StageCall(time_call(est, rule.threshold, rule.margin if confirming else None), mem, est, base_peak, new_peak)


def combine(time: str, memory: str) -> str:
    """One verdict from a time and a memory call (``slower, more memory`` when both)."""
    parts = [c for c in (time, memory) if c != SAME]
    return ", ".join(parts) if parts else SAME


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on one cell and what it rests on."""

    verdict: str
    screen: StageCall
    confirm: StageCall | None = None

    @property
    def regression(self) -> bool:
        return self.verdict in REGRESSIONS

    @property
    def detail(self) -> str:
        text = f"screen {self.screen.estimate.text()}"
        if self.confirm is not None:
            text += f"; confirm {self.confirm.estimate.text()}"
        return text


def decide(screen_pairs: Sequence[Pair], confirm_pairs: Sequence[Pair] | None, rule: GateRule) -> Decision:
    """The verdict: the screen's call where it flags nothing; else each flagged call that
    the confirming rounds make again, in the same direction (``not confirmed`` if none).

    ``confirm_pairs`` is None while a flagged cell has not been confirmed yet (the
    screen's call is then returned as it stands, for the scheduler to act on).
    """
    screen = judge(screen_pairs, rule)
    if not screen.flagged or confirm_pairs is None:
        return Decision(combine(screen.time, screen.memory), screen)
    confirm = judge(confirm_pairs, rule, confirming=True)
    time = screen.time if screen.time != SAME and confirm.time == screen.time else SAME
    memory = screen.memory if screen.memory != SAME and confirm.memory == screen.memory else SAME
    verdict = combine(time, memory)
    return Decision(NOT_CONFIRMED if verdict == SAME else verdict, screen, confirm)
