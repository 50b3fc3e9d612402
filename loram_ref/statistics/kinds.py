"""Statistics kinds: what data-derived layer statistics an initializer consumes.

A kind bundles the statistics type with its sources: a synthetic maker (random statistics
of the right shapes and structure, for timing and tests), the sums it reads from the one
statistics pass every kind shares (``needs``, ``loram_ref.statistics.moments``) and how its
statistics follow from them (``from_moments``), and the same from a layer task's gradient
oracle (``from_oracle``). Initializers name their kind on the registry; the harness and the
loss benchmark call ``kind.synthetic``, :func:`collect_kinds` (``kind.collect`` for one kind
alone) and ``kind.from_oracle``, and never dispatch on names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .collect import (
    CORDA_NEEDS,
    EVA_NEEDS,
    GRADIENT_NEEDS,
    LORA_DA_NEEDS,
    LORA_SB_NEEDS,
    CollectContext,
    corda_from_moments,
    corda_from_oracle,
    eva_from_moments,
    eva_from_oracle,
    gradient_from_moments,
    gradient_from_oracle,
    lora_da_from_moments,
    lora_da_from_oracle,
    lora_sb_from_moments,
    lora_sb_from_oracle,
    target_layers,
)
from .moments import LayerMoments, check_needs, collect_moments
from .types import GradientStats, InputCovarianceStats, InputMomentsStats, LoraDAStats, LoraSBStats

#: ``synthetic(m, n, generator, device) -> stats``
SyntheticMaker = Callable[[int, int, torch.Generator, Any], Any]
#: ``at_lr(stats, meta, factor) -> (stats, meta)``: one layer's statistics for a run at
#: ``factor`` times the learning rate they were collected at
LrRescale = Callable[[Any, dict[str, Any], float], tuple[Any, dict[str, Any]]]
#: ``from_oracle(oracle, ctx, samples) -> (stats, meta)``: one layer's statistics from a
#: ``loram_ref.statistics.collect.GradientOracle`` (a synthetic layer task instead of a model pass)
OracleCollector = Callable[..., tuple[Any, dict[str, Any]]]
#: ``from_moments(moments, ctx) -> (stats, meta)``: one layer's statistics from the shared pass's sums
FromMoments = Callable[[LayerMoments, CollectContext], tuple[Any, dict[str, Any]]]


@dataclass(frozen=True)
class StatisticsKind:
    """One kind of layer statistics; ``needed`` is False for data-free initializers.

    Attributes:
        name: the kind's name (also the ``stats`` keyword's meaning in the initializer).
        synthetic: makes synthetic statistics for an ``m x n`` layer.
        default_samples: how many training blocks the collector reads by default.
        lr_rescale: how statistics collected at one learning rate become those of another
            (None: they do not depend on the learning rate). A learning-rate grid then
            collects once per seed and derives the rest.
        from_oracle: the same statistics from a layer task that knows its gradients.
        needs: the sums of the shared statistics pass it reads (``.moments.NEEDS``).
        from_moments: its statistics from those sums; every kind with it is collected by
            :func:`collect_kinds`, one pass for all of them.
        label: the pass in words, for ``loram-bench list`` and the report.
    """

    name: str
    synthetic: SyntheticMaker | None = None
    default_samples: int = 0
    lr_rescale: LrRescale | None = None
    from_oracle: OracleCollector | None = None
    needs: frozenset[str] = frozenset()
    from_moments: FromMoments | None = None
    label: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", check_needs(self.needs))
        if self.synthetic is not None and self.from_moments is None:
            raise ValueError(f"statistics kind {self.name!r} needs from_moments (how its statistics follow from the "
                             "shared pass's sums) and needs (which sums)")

    def collect(self, model, blocks: torch.Tensor, target_names: list[str], ctx: CollectContext
                ) -> tuple[dict[str, Any], dict[str, Any]]:
        """This kind's statistics over ``blocks`` from a pass of its own: ``({layer: stats}, meta)``."""
        return collect_kinds(model, {self.name: (self, blocks)}, target_names, ctx)[self.name]

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


def _lora_da_from_moments(moments: LayerMoments, ctx: CollectContext) -> tuple[LoraDAStats, dict[str, Any]]:
    stats = lora_da_from_moments(moments, ctx.num_train)
    return stats, {"tokens": moments.tokens, "num_train": ctx.num_train}


def collect_kinds(model, blocks_by_kind: dict[str, tuple["StatisticsKind", torch.Tensor]], target_names: list[str],
                  ctx: CollectContext) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Every kind's statistics from one pass: ``{kind name: ({layer: stats}, meta)}`` for
    ``blocks_by_kind = {kind name: (kind, its blocks)}``.

    Each kind reads its own blocks, and they must be prefixes of one sequence (a kind that
    reads 8 samples and one that reads 32 read the same first 8): the pass runs over the
    longest, accumulating the union of the kinds' needs, and each kind's sums are copied at
    its own count (``.moments.collect_moments``), so a kind gets what it would get alone.
    """
    chosen = {name: (kind, blocks) for name, (kind, blocks) in blocks_by_kind.items() if kind.needed}
    if not chosen:
        return {}
    kinds = [kind for kind, _ in chosen.values()]
    count = {kind.name: len(blocks) for kind, blocks in chosen.values()}
    longest = max((blocks for _, blocks in chosen.values()), key=len)
    for kind, blocks in chosen.values():
        if len(blocks) < 1 or not torch.equal(blocks, longest[: len(blocks)]):
            raise ValueError(f"statistics kind {kind.name!r}: its blocks must be a non-empty prefix of the longest "
                             "kind's blocks (one pass serves them all)")
    needs = frozenset().union(*(k.needs for k in kinds))
    moments = collect_moments(model, longest, target_layers(model, target_names), needs, batch_size=ctx.batch_size,
                              loss_fn=ctx.loss_fn, checkpoints=list(count.values()))
    out = {}
    for kind in kinds:
        stats, meta = derive(kind, moments[count[kind.name]], ctx)
        out[kind.name] = (stats, {**meta, "shared_needs": ",".join(sorted(needs))})
    return out


def derive(kind: "StatisticsKind", per_layer: dict[str, LayerMoments], ctx: CollectContext
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kind``'s statistics for every layer from the shared pass's sums: ``({layer: stats},
    meta)``, with the samples read and the seconds the derivation took."""
    stats, meta = {}, {}
    t0 = time.perf_counter()
    for layer, sums in per_layer.items():
        stats[layer], meta = kind.from_moments(sums, ctx)
    samples = next(iter(per_layer.values())).samples if per_layer else 0
    return stats, {**meta, "samples": samples, "derive_seconds": time.perf_counter() - t0}


def _synthetic_gradient(m: int, n: int, generator: torch.Generator, device="cpu") -> GradientStats:
    return GradientStats.synthetic(m, n, generator, device=device)


def _synthetic_covariance(m: int, n: int, generator: torch.Generator, device="cpu") -> InputCovarianceStats:
    return InputCovarianceStats.synthetic(m, n, generator, device=device)


def _synthetic_moments(m: int, n: int, generator: torch.Generator, device="cpu") -> InputMomentsStats:
    return InputMomentsStats.synthetic(m, n, generator, device=device)


NO_STATISTICS = StatisticsKind("none")
LORA_SB_STATISTICS = StatisticsKind("lora_sb", _synthetic_lora_sb, default_samples=8, lr_rescale=_lora_sb_at_lr,
                                    from_oracle=lora_sb_from_oracle, needs=LORA_SB_NEEDS,
                                    from_moments=lora_sb_from_moments, label="gradient pass (sign of Σ∇W)")
LORA_DA_STATISTICS = StatisticsKind("lora_da", _synthetic_lora_da, default_samples=32, from_oracle=lora_da_from_oracle,
                                    needs=LORA_DA_NEEDS, from_moments=_lora_da_from_moments,
                                    label="gradient pass with K-FAC factors (G, Z, y²)")
GRADIENT_STATISTICS = StatisticsKind("gradient", _synthetic_gradient, default_samples=8,
                                     from_oracle=gradient_from_oracle, needs=GRADIENT_NEEDS,
                                     from_moments=gradient_from_moments, label="gradient pass (mean G)")
CORDA_STATISTICS = StatisticsKind("input_covariance", _synthetic_covariance, default_samples=32,
                                  from_oracle=corda_from_oracle, needs=CORDA_NEEDS, from_moments=corda_from_moments,
                                  label="forward pass (input covariance, per-sample max-scaled)")
EVA_STATISTICS = StatisticsKind("input_moments", _synthetic_moments, default_samples=32, from_oracle=eva_from_oracle,
                                needs=EVA_NEEDS, from_moments=eva_from_moments,
                                label="forward pass (input moments)")


class Statistics:
    """The kinds by their short names (``Statistics.NONE`` etc.)."""

    NONE = NO_STATISTICS
    LORA_SB = LORA_SB_STATISTICS
    LORA_DA = LORA_DA_STATISTICS
    GRADIENT = GRADIENT_STATISTICS
    INPUT_COVARIANCE = CORDA_STATISTICS
    INPUT_MOMENTS = EVA_STATISTICS
