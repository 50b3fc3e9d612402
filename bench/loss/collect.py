"""Layer statistics for the data-aware initializers, collected from the training data.

* LoRA-SB (spec §3 "Data statistic"): the base model's gradients summed over
  ``samples`` training blocks (each batch's mean loss divided by its size), then
  ``ΔW = -η·sign(Σ∇W)``, Adam's first step from zero moments.
* LoRA-DA (spec §4 steps 1-2): the mean gradient ``G`` over ``samples`` blocks at batch
  size 1, the K-FAC input factor ``Z = (1/T) Σ_t x_t x_tᵀ`` and the diagonal output
  factor ``y² = (1/T) Σ_t (∂L_j/∂y_t)²`` of every targeted linear layer.

Only the targeted linear weights keep gradients (the code computes all and uses these).
Both collectors report their wall time and the peak memory of the pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from loram_ref import LoraDAStats, LoraSBStats

from ..measure import cpu_peak, gpu_peak


@dataclass
class Collected:
    stats: dict[str, Any]
    seconds: float
    samples: int
    peak_cpu_extra_bytes: int
    peak_gpu_allocated_bytes: int
    meta: dict[str, Any] = field(default_factory=dict)


def _targets(model, names: list[str]) -> dict[str, torch.nn.Linear]:
    """Targeted linear layers, keyed as PEFT will name them (``base_model.model.`` + name)."""
    return {
        f"base_model.model.{n}": m for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names
    }


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _only_targets_require_grad(model, targets: dict[str, torch.nn.Linear]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)


def collect_lora_sb(model, batches: list[torch.Tensor], target_names: list[str], eta: float) -> Collected:
    """Σ of per-batch gradients of ``loss_b/|b|`` over the given batches, then the sign update."""
    targets = _targets(model, target_names)
    _only_targets_require_grad(model, targets)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with cpu_peak() as cpu, gpu_peak(device) as gpu:
        sums = {k: torch.zeros_like(m.weight, dtype=torch.float32) for k, m in targets.items()}
        for ids in batches:
            model.zero_grad(set_to_none=True)
            (_loss(model, ids) / ids.shape[0]).backward()
            for k, m in targets.items():
                sums[k] += m.weight.grad.float()
        stats = {k: LoraSBStats.from_gradient_sum(g, eta) for k, g in sums.items()}
    model.zero_grad(set_to_none=True)
    return Collected(stats, time.perf_counter() - t0, sum(len(b) for b in batches), cpu.extra_bytes,
                     gpu.allocated_bytes, {"eta_eff": eta})


def collect_lora_da(model, blocks: torch.Tensor, target_names: list[str], num_train: int) -> Collected:
    """Mean gradient, K-FAC input factor and diagonal output factor, batch size 1.

    One pass computes all three: the spec's two passes run over the same samples
    (fisher_offset 0), so the gradient pass and the factor pass see identical inputs.
    """
    targets = _targets(model, target_names)
    _only_targets_require_grad(model, targets)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    handles = []
    with cpu_peak() as cpu, gpu_peak(device) as gpu:
        grads = {k: torch.zeros_like(m.weight, dtype=torch.float32) for k, m in targets.items()}
        z = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=device) for k, m in targets.items()}
        y2 = {k: torch.zeros(m.out_features, dtype=torch.float32, device=device) for k, m in targets.items()}
        tokens = 0

        for key, module in targets.items():
            def output_grad_hook(g: torch.Tensor, key: str = key) -> None:
                y2[key].add_(g.detach().reshape(-1, g.shape[-1]).float().square().sum(0))  # Σ_t (∂L_j/∂y_t)²

            def forward_hook(_module, inputs, output, key=key, grad_hook=output_grad_hook):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                z[key].addmm_(x.mT, x)  # Σ_t x_t x_tᵀ
                if output.requires_grad:
                    output.register_hook(grad_hook)

            handles.append(module.register_forward_hook(forward_hook))
        try:
            for ids in blocks:
                ids = ids[None, :]
                model.zero_grad(set_to_none=True)
                _loss(model, ids).backward()  # L_j: the sample's mean token loss
                tokens += ids.numel()
                for k, m in targets.items():
                    grads[k] += m.weight.grad.float()
        finally:
            for h in handles:
                h.remove()
        n = len(blocks)
        stats = {
            k: LoraDAStats(grad=grads[k] / n, input_factor=z[k] / tokens, output_factor=y2[k] / tokens, num_train=num_train)
            for k in targets
        }
    model.zero_grad(set_to_none=True)
    return Collected(stats, time.perf_counter() - t0, n, cpu.extra_bytes, gpu.allocated_bytes,
                     {"tokens": tokens, "num_train": num_train})
