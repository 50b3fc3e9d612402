"""Statistics kinds: what data-derived layer statistics an initializer consumes.

A kind bundles the statistics type with its two sources: a synthetic maker (random
statistics of the right shapes and structure, for timing and tests) and a collector
(the paper's statistics pass over a model and its training data, ``loram_ref.statistics.collect``).
Initializers name their kind on the registry; the harness and the loss benchmark call
``kind.synthetic`` and ``kind.collect`` and never dispatch on names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .collect import collect_lora_da, collect_lora_sb, lora_da_from_oracle, lora_sb_from_oracle
from .types import LoraDAStats, LoraSBStats

#: ``synthetic(m, n, generator, device) -> stats``
SyntheticMaker = Callable[[int, int, torch.Generator, Any], Any]
#: ``collect(model, blocks, target_names, ctx) -> ({layer name: stats}, meta)``
Collector = Callable[..., tuple[dict[str, Any], dict[str, Any]]]
#: ``at_lr(stats, meta, factor) -> (stats, meta)``: one layer's statistics for a run at
#: ``factor`` times the learning rate they were collected at
LrRescale = Callable[[Any, dict[str, Any], float], tuple[Any, dict[str, Any]]]
#: ``from_oracle(oracle, ctx, samples) -> (stats, meta)``: one layer's statistics from a
#: ``loram_ref.statistics.collect.GradientOracle`` (a synthetic layer task instead of a model pass)
OracleCollector = Callable[..., tuple[Any, dict[str, Any]]]


@dataclass(frozen=True)
class StatisticsKind:
    """One kind of layer statistics; ``needed`` is False for data-free initializers.

    Attributes:
        name: the kind's name (also the ``stats`` keyword's meaning in the initializer).
        synthetic: makes synthetic statistics for an ``m x n`` layer.
        collect: collects real statistics from a model and training blocks.
        default_samples: how many training blocks the collector reads by default.
        lr_rescale: how statistics collected at one learning rate become those of another
            (None: they do not depend on the learning rate). A learning-rate grid then
            collects once per seed and derives the rest.
        from_oracle: the same statistics from a layer task that knows its gradients.
    """

    name: str
    synthetic: SyntheticMaker | None = None
    collect: Collector | None = None
    default_samples: int = 0
    lr_rescale: LrRescale | None = None
    from_oracle: OracleCollector | None = None

    @property
    def needed(self) -> bool:
        return self.synthetic is not None

    def at_lr(self, stats: dict[str, Any], meta: dict[str, Any], collected_lr: float, lr: float
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Per-layer ``stats`` (and the collector's ``meta``) collected at ``collected_lr``, as
        they are for a run at ``lr``; the same objects when the kind does not depend on lr."""
        if self.lr_rescale is None or lr == collected_lr:
            return stats, meta
        factor = lr / collected_lr
        out, new_meta = {}, meta
        for name, layer in stats.items():
            out[name], new_meta = self.lr_rescale(layer, meta, factor)
        return out, new_meta


def _synthetic_lora_sb(m: int, n: int, generator: torch.Generator, device="cpu") -> LoraSBStats:
    return LoraSBStats.synthetic(m, n, generator, device=device)


def _synthetic_lora_da(m: int, n: int, generator: torch.Generator, device="cpu") -> LoraDAStats:
    """At most 512 Gaussian tokens for Z plus a 1e-2 ridge: a PSD factor of the right shape
    (the solve's cost does not depend on how many tokens built it)."""
    stats = LoraDAStats.synthetic(m, n, generator, tokens=min(2 * n, 512), device=device)
    stats.input_factor.diagonal().add_(1e-2)
    return stats


def _lora_sb_at_lr(stats: LoraSBStats, meta: dict[str, Any], factor: float) -> tuple[LoraSBStats, dict[str, Any]]:
    """ΔW = -η·sign(Σ∇W) with η = lr / (warmup_ratio · #batches) (docs/initializers.md §3): η, and so ΔW,
    is proportional to lr; the gradient signs do not depend on it."""
    new_meta = {**meta, "eta_eff": meta["eta_eff"] * factor} if "eta_eff" in meta else dict(meta)
    return LoraSBStats(update=stats.update * factor), new_meta


NO_STATISTICS = StatisticsKind("none")
LORA_SB_STATISTICS = StatisticsKind("lora_sb", _synthetic_lora_sb, collect_lora_sb, default_samples=8,
                                    lr_rescale=_lora_sb_at_lr, from_oracle=lora_sb_from_oracle)
LORA_DA_STATISTICS = StatisticsKind("lora_da", _synthetic_lora_da, collect_lora_da, default_samples=32,
                                    from_oracle=lora_da_from_oracle)


class Statistics:
    """The kinds by their short names (``Statistics.NONE`` etc.)."""

    NONE = NO_STATISTICS
    LORA_SB = LORA_SB_STATISTICS
    LORA_DA = LORA_DA_STATISTICS
