"""Put loram_ref factors into a PEFT LoRA model, layer by layer.

PEFT creates the adapters (``init_lora_weights=False``: its own init is overwritten);
then, per targeted linear layer, the initializer runs on the frozen base weight and we
set ``lora_A``, ``lora_B`` and, where the method rewrites ``W``, the base weight. The
result is an ordinary PEFT model that saves and loads as usual.

The factors the registry's ``trains`` leaves out are frozen (MiCA: B). LoRA-SB trains only
the r x r matrix R between frozen B and A (LoRA-XS form). It is
attached as a parametrization of ``lora_A.weight`` (``weight = R·A``), so PEFT's forward
is unchanged; :func:`merge_lora_sb` folds R into A before saving, which leaves a normal
PEFT adapter with ``lora_A = R·A``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

import loram_ref
from loram_ref.linalg import gram_norm_sq


class LeftMultiply(nn.Module):
    """Parametrization ``A ↦ R·A`` with R trainable and the original A frozen."""

    def __init__(self, r: torch.Tensor):
        super().__init__()
        self.R = nn.Parameter(r)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.R @ a


@dataclass
class LayerInit:
    name: str
    shape: tuple[int, int]
    seconds: float
    w_norm: float
    delta_norm: float  # ‖s·B·A‖_F
    shift_norm: float  # ‖W_eff - W‖_F at step 0
    info: dict[str, Any] = field(default_factory=dict)


def lora_layers(model) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _layer_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**63)


@torch.no_grad()
def apply_initializer(
    model, name: str, *, seed: int, stats: dict[str, Any] | None = None, adapter: str = "default", options: dict | None = None
) -> list[LayerInit]:
    """Initialize every LoRA layer of ``model`` with loram_ref's ``name``."""
    spec = loram_ref.get_initializer(name)
    options = dict(options or {})
    records = []
    for index, (layer_name, layer) in enumerate(lora_layers(model)):
        base = layer.get_base_layer()
        weight = base.weight
        rank, scaling = layer.r[adapter], layer.scaling[adapter]
        kwargs = dict(options)
        if spec.needs_statistics:
            if stats is None or layer_name not in stats:
                raise ValueError(f"{name} needs layer statistics; none collected for {layer_name}")
            kwargs["stats"] = stats[layer_name]
        generator = (torch.Generator(device=weight.device).manual_seed(_layer_seed(seed, index))
                     if "generator" in spec.harness else None)
        # the layer's name in the base model: LoRA-DA's official per-module seeds (an option may set it)
        module = None if spec.harness.get("module") in kwargs else layer_name.removeprefix("base_model.model.")
        kwargs.update(spec.harness_kwargs(generator=generator, module=module))
        original = weight.detach().clone()
        t0 = time.perf_counter()
        init = spec.fn(weight.detach(), rank, scaling, **kwargs)
        seconds = time.perf_counter() - t0
        lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
        lora_a.weight.data = init.A.to(lora_a.weight.dtype).contiguous()
        lora_b.weight.data = init.B.to(lora_b.weight.dtype).contiguous()
        if init.residual is not None:
            weight.data = init.residual.to(weight.dtype)
        for label, factor in (("A", lora_a), ("B", lora_b)):  # what the registry says trains (MiCA: A only)
            if label not in spec.trains:
                factor.weight.requires_grad_(False)
        if init.R is not None:
            lora_a.weight.requires_grad_(False)
            lora_b.weight.requires_grad_(False)
            parametrize.register_parametrization(lora_a, "weight", LeftMultiply(init.R.to(lora_a.weight.dtype)), unsafe=True)
            lora_a.parametrizations.weight.original.requires_grad_(False)
        delta = init.delta()
        w = original.float()
        w_eff = (init.residual.float() if init.residual is not None else w) + delta
        records.append(LayerInit(
            name=layer_name, shape=tuple(weight.shape), seconds=seconds, w_norm=float(w.norm()),
            delta_norm=float(delta.norm()), shift_norm=float((w_eff - w).norm()),
            info={k: v for k, v in init.info.items() if isinstance(v, (int, float, str, bool))},
        ))
    return records


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
