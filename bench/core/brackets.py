"""Bracketed learning rates, shared by the loss benchmarks: a best lr counts only when both of
its neighbours were run and did worse.

An optimum at the edge of the grid says only that the best lr is *at or beyond* the edge:
an initializer compared at it against a reference whose optimum lies inside the grid is
compared at a handicap it did not earn (or escapes one). The drivers therefore extend the
grid, one lr at a time, by a fixed factor beyond the edge the optimum sits on, up to a stated
number of extensions per side, and resume; a choice still at an edge after that is
*provisional (edge)* and every verdict resting on it says so.

Rule, given the mean final loss per lr over the selection seeds (an lr where any seed
diverged counts as worse than every finished one):

* ``best``: the finite mean lowest;
* ``bracketed``: an lr was run below and above ``best`` and both did worse (or diverged);
* otherwise the next lr to run is the grid's lowest lr ÷ ``factor^(j+1)`` (optimum at the
  low edge, j lrs already below the grid) or its highest × ``factor^(j+1)`` (high edge), to 3
  significant digits, unless that side already has ``max_extensions`` lrs beyond the starting
  grid: then the choice is final and provisional.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The factor between an edge and the lr added beyond it: half a decade, the spacing of the
#: suites' starting grids (1e-4, 3e-4, 1e-3, ...).
LR_FACTOR = math.sqrt(10.0)
#: lrs added beyond each edge of the starting grid at most (1.5 decades at the factor above).
MAX_EXTENSIONS = 3

#: The help of the ``--no-bracket`` and ``--selection-seeds`` flags both loss benchmarks have.
BRACKET_HELP = ("keep the lr grid as given (default: extend it beyond an edge optimum by √10 until the optimum is "
                "bracketed, at most 3 lrs beyond each edge)")
SELECTION_SEEDS_HELP = ("seeds the lrs are chosen on (none: chosen on --seeds, which flatters the winner); must not "
                        "overlap --seeds")

BRACKETED = "bracketed"
EDGE_LOW = "provisional (edge: lowest lr run)"
EDGE_HIGH = "provisional (edge: highest lr run)"
ALL_DIVERGED = "every lr diverged"


@dataclass(frozen=True)
class LrChoice:
    """The chosen lr, whether it is bracketed, and the lr to run next (None: the choice is final)."""

    lr: float | None
    status: str
    next_lr: float | None = None

    @property
    def bracketed(self) -> bool:
        return self.status == BRACKETED


def choose_lr(means: dict[float, float], grid: list[float], *, factor: float = LR_FACTOR,
              max_extensions: int = MAX_EXTENSIONS) -> LrChoice:
    """The choice for one (configuration, initializer) from ``means`` (lr → mean final loss
    over the selection seeds, NaN where a seed diverged) and the starting ``grid``."""
    if not means:
        return LrChoice(None, ALL_DIVERGED)
    if not (factor > 1 and math.isfinite(factor)):
        raise ValueError(f"the lr extension factor must be finite and > 1, got {factor}")
    finite = {lr: v for lr, v in means.items() if math.isfinite(v)}
    run = sorted(means)
    low_edge, high_edge = min(grid), max(grid)
    below_grid = sum(1 for lr in run if lr < low_edge * (1 - 1e-9))
    above_grid = sum(1 for lr in run if lr > high_edge * (1 + 1e-9))
    lower = _round(low_edge / factor ** (below_grid + 1))  # the next lr beyond each edge, from the grid's own
    higher = _round(high_edge * factor ** (above_grid + 1))
    if not finite:  # everything diverged: try lower, if allowed
        if below_grid < max_extensions:
            return LrChoice(None, ALL_DIVERGED, lower)
        return LrChoice(None, ALL_DIVERGED)
    best = min(finite, key=lambda lr: (finite[lr], lr))
    i = run.index(best)

    def worse(j: int) -> bool:
        return not math.isfinite(means[run[j]]) or means[run[j]] > finite[best]

    if 0 < i < len(run) - 1 and worse(i - 1) and worse(i + 1):
        return LrChoice(best, BRACKETED)
    if i == 0 or not worse(i - 1):
        return LrChoice(best, EDGE_LOW, lower if below_grid < max_extensions and i == 0 else None)
    return LrChoice(best, EDGE_HIGH, higher if above_grid < max_extensions and i == len(run) - 1 else None)


def _round(lr: float) -> float:
    """An lr to 3 significant digits (3.16e-2, not 0.031622776601683794): the same value on every machine."""
    return float(f"{lr:.3g}")
