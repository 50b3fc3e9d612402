"""The statistics passes of the data-aware initializers, timed and with their peak memory.

What is collected is defined by each initializer's statistics kind on the registry
(``loram_ref.statistics``; the one pass all kinds share is ``loram_ref.statistics.moments``). This
module only measures a pass: its wall time and the peak CPU / GPU memory it took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bench.core.measure import cpu_peak, gpu_peak
from loram_ref import CollectContext, StatisticsKind
from loram_ref.statistics import collect_kinds
from loram_ref.statistics.collect import gradient_sign_update, kfac_statistics


@dataclass
class Collected:
    stats: dict[str, Any]
    seconds: float
    samples: int
    peak_cpu_extra_bytes: int
    peak_gpu_allocated_bytes: int
    meta: dict[str, Any] = field(default_factory=dict)


def _measured(model, samples: int, run: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> Collected:
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with cpu_peak() as cpu, gpu_peak(device) as gpu:
        stats, meta = run()
    return Collected(stats, time.perf_counter() - t0, samples, cpu.extra_bytes, gpu.allocated_bytes, meta)


def collect_shared(model, blocks_by_kind: dict[str, tuple[StatisticsKind, torch.Tensor]], target_names: list[str],
                   ctx: CollectContext) -> dict[str, Collected]:
    """Every kind's statistics from one pass (``loram_ref.statistics.collect_kinds``), each
    kind over its own blocks (prefixes of one sequence). The pass's time and peaks are the
    kinds' together (``seconds``, the same for each; ``meta["pass_kinds"]`` says how many
    shared it); ``meta["derive_seconds"]`` is each kind's own step from the sums."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with cpu_peak() as cpu, gpu_peak(device) as gpu:
        found = collect_kinds(model, blocks_by_kind, target_names, ctx)
    seconds = time.perf_counter() - t0
    return {name: Collected(stats, seconds, len(blocks_by_kind[name][1]), cpu.extra_bytes, gpu.allocated_bytes,
                            {**meta, "pass_kinds": len(found)})
            for name, (stats, meta) in found.items()}


def collect_statistics(kind: StatisticsKind, model, blocks: torch.Tensor, target_names: list[str],
                       ctx: CollectContext) -> Collected | None:
    """Run ``kind``'s statistics pass alone over ``blocks``; ``None`` for a kind that needs no statistics."""
    if not kind.needed:
        return None
    return collect_shared(model, {kind.name: (kind, blocks)}, target_names, ctx)[kind.name]


def collect_lora_sb(model, batches: list[torch.Tensor], target_names: list[str], eta: float) -> Collected:
    """LoRA-SB's gradient-sign update over explicit batches, with a given η (docs/initializers.md §3)."""
    return _measured(model, sum(len(b) for b in batches),
                     lambda: (gradient_sign_update(model, batches, target_names, eta), {"eta_eff": eta}))


def collect_lora_da(model, blocks: torch.Tensor, target_names: list[str], num_train: int) -> Collected:
    """LoRA-DA's mean gradient and K-FAC factors at batch size 1 (docs/initializers.md §4)."""

    def run():
        stats, tokens = kfac_statistics(model, blocks, target_names, num_train)
        return stats, {"tokens": tokens, "num_train": num_train}

    return _measured(model, len(blocks), run)
