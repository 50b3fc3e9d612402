"""Statistics kinds: what data-derived layer statistics an initializer consumes.

A kind bundles the statistics type with its two sources: a synthetic maker (random
statistics of the right shapes and structure, for timing and tests) and a collector
(the paper's statistics pass over a model and its training data, ``loram_ref.collect``).
Initializers name their kind on the registry; the harness and the loss benchmark call
``kind.synthetic`` and ``kind.collect`` and never dispatch on names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .collect import collect_lora_da, collect_lora_sb
from .stats import LoraDAStats, LoraSBStats

#: ``synthetic(m, n, generator, device) -> stats``
SyntheticMaker = Callable[[int, int, torch.Generator, Any], Any]
#: ``collect(model, blocks, target_names, ctx) -> ({layer name: stats}, meta)``
Collector = Callable[..., tuple[dict[str, Any], dict[str, Any]]]


@dataclass(frozen=True)
class StatisticsKind:
    """One kind of layer statistics; ``needed`` is False for data-free initializers.

    Attributes:
        name: the kind's name (also the ``stats`` keyword's meaning in the initializer).
        synthetic: makes synthetic statistics for an ``m x n`` layer.
        collect: collects real statistics from a model and training blocks.
        default_samples: how many training blocks the collector reads by default.
    """

    name: str
    synthetic: SyntheticMaker | None = None
    collect: Collector | None = None
    default_samples: int = 0

    @property
    def needed(self) -> bool:
        return self.synthetic is not None


def _synthetic_lora_sb(m: int, n: int, generator: torch.Generator, device="cpu") -> LoraSBStats:
    return LoraSBStats.synthetic(m, n, generator, device=device)


def _synthetic_lora_da(m: int, n: int, generator: torch.Generator, device="cpu") -> LoraDAStats:
    """At most 512 Gaussian tokens for Z plus a 1e-2 ridge: a PSD factor of the right shape
    (the solve's cost does not depend on how many tokens built it)."""
    stats = LoraDAStats.synthetic(m, n, generator, tokens=min(2 * n, 512), device=device)
    stats.input_factor.diagonal().add_(1e-2)
    return stats


NO_STATISTICS = StatisticsKind("none")
LORA_SB_STATISTICS = StatisticsKind("lora_sb", _synthetic_lora_sb, collect_lora_sb, default_samples=8)
LORA_DA_STATISTICS = StatisticsKind("lora_da", _synthetic_lora_da, collect_lora_da, default_samples=32)


class Statistics:
    """The kinds by their short names (``Statistics.NONE`` etc.)."""

    NONE = NO_STATISTICS
    LORA_SB = LORA_SB_STATISTICS
    LORA_DA = LORA_DA_STATISTICS
