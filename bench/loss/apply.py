"""The loss benchmark's view of an initialized PEFT model: the initialization itself is the
public adoption API (``loram_ref.peft.initialize``), so a user's model and the benchmark's
runs go through the same code; here are the update measures of a run.

PEFT creates the adapters (``init_lora_weights=False``: its own init is overwritten).
LoRA-SB's trainable R is a parametrization of ``lora_A.weight`` (``weight = R·A``);
:func:`merge_lora_sb` folds R into A before saving, which leaves a normal PEFT adapter
with ``lora_A = R·A``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn.utils import parametrize

from loram_ref.linalg import gram_norm_sq
from loram_ref.peft import LayerReport, initialize


def lora_layers(model) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def apply_initializer(
    model, name: str, *, seed: int, stats: dict[str, Any] | None = None, adapter: str = "default", options: dict | None = None
) -> list[LayerReport]:
    """Initialize every LoRA layer of ``model`` with loram_ref's ``name`` from statistics the
    benchmark collected and measured (``bench.loss.stats_pass``); one report per layer."""
    report = initialize(model, name, adapter_name=adapter, seed=seed, stats=stats, options=options)
    return list(report.layers)


def merge_lora_sb(model, adapter: str = "default") -> None:
    """Fold every trained R into its A (``lora_A ← R·A``): a plain PEFT adapter remains."""
    for _, layer in lora_layers(model):
        lora_a = layer.lora_A[adapter]
        if parametrize.is_parametrized(lora_a, "weight"):
            parametrize.remove_parametrizations(lora_a, "weight", leave_parametrized=True)


def adapter_factors(layer, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """The current effective (A, B) of a layer; for LoRA-SB, A is R·A."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def product_diff_norm_sq(b1, a1, b0, a0) -> float:
    """``‖B1·A1 - B0·A0‖_F²`` without forming the m x n products.

    With ``X = [B1, -B0]`` (m x 2r) and ``Y = [A1; A0]`` (2r x n), the product is ``X·Y``
    and ``‖XY‖_F² = Σ (XᵀX) ∘ (YYᵀ)``: O((m+n)·r²) work and memory.
    """
    x = torch.cat([b1, -b0], dim=1).double()
    y = torch.cat([a1, a0], dim=0).double()
    return float(gram_norm_sq(x, y.mT).clamp(min=0.0))


def update_norm(model, snapshot: list[tuple[torch.Tensor, torch.Tensor, float]], adapter: str = "default") -> float:
    """Σ over layers of ``‖ΔW‖_F = s·‖B_t·A_t - B_0·A_0‖_F`` since ``snapshot``."""
    total = 0.0
    with torch.no_grad():
        for (_, layer), (a0, b0, s) in zip(lora_layers(model), snapshot):
            a1, b1 = adapter_factors(layer, adapter)
            total += s * math.sqrt(product_diff_norm_sq(b1, a1, b0, a0))
    return total


def snapshot_factors(model, adapter: str = "default") -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    with torch.no_grad():
        return [
            (a.detach().clone(), b.detach().clone(), layer.scaling[adapter])
            for (_, layer), (a, b) in ((item, adapter_factors(item[1], adapter)) for item in lora_layers(model))
        ]


def update_spectra(model, snapshot: list[tuple[torch.Tensor, torch.Tensor, float]], w_norms: list[float],
                   adapter: str = "default") -> dict[str, dict[str, float]]:
    """Per projection type (``q_proj``, ``down_proj``, ...), over its layers: the mean of
    ``‖ΔW‖_F/‖W‖_F`` and of the stable rank ``‖ΔW‖_F²/‖ΔW‖_2²`` of ``ΔW = s·(B_t·A_t − B₀·A₀)``,
    the change fine-tuning made. From the factors: thin QRs of ``[B_t, −B₀]`` and
    ``[A_t; A₀]ᵀ`` and the singular values of the 2r x 2r core, O((m+n)·r²)."""
    found: dict[str, list[tuple[float, float]]] = {}
    with torch.no_grad():
        for (name, layer), (a0, b0, s), w_norm in zip(lora_layers(model), snapshot, w_norms):
            a1, b1 = adapter_factors(layer, adapter)
            _, r_left = torch.linalg.qr(torch.cat([b1, -b0], dim=1).double())
            _, r_right = torch.linalg.qr(torch.cat([a1, a0], dim=0).double().mT)
            sv = torch.linalg.svdvals(r_left @ r_right.mT) * s
            energy = float(sv.square().sum())
            stable = energy / float(sv[0]) ** 2 if float(sv[0]) > 0 else math.nan
            found.setdefault(name.rsplit(".", 1)[-1], []).append((math.sqrt(energy) / w_norm if w_norm else math.nan,
                                                                   stable))
    return {kind: {"rel_norm": sum(v[0] for v in values) / len(values),
                   "stable_rank": sum(v[1] for v in values) / len(values), "layers": len(values)}
            for kind, values in sorted(found.items())}
