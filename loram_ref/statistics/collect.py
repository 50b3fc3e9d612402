"""Collecting the data-aware initializers' layer statistics from a model and its data.

These are the statistics passes the papers define, as pure torch on an ``nn.Module``
whose targeted ``nn.Linear`` layers are named by their last path component:

* LoRA-SB (docs/initializers.md §3 "Data statistic"): the base model's gradients summed over the given
  batches (each batch's mean loss divided by its size), then ``ΔW = -η·sign(Σ∇W)``,
  Adam's first step from zero moments.
* LoRA-DA (docs/initializers.md §4 steps 1-2): the mean gradient ``G`` over samples at batch size 1,
  the K-FAC input factor ``Z = (1/T) Σ_t x_t x_tᵀ`` and the diagonal output factor
  ``y² = (1/T) Σ_t (∂L_j/∂y_t)²`` of every targeted linear layer.

Only the targeted linear weights keep gradients. Timing and peak memory of a pass are
the benchmark's business (``bench.loss.stats_pass``), not this module's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from .types import LoraDAStats, LoraSBStats


def causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of a Hugging Face causal LM on ``ids``."""
    return model(input_ids=ids, labels=ids).loss


@dataclass(frozen=True)
class CollectContext:
    """What a collector needs to know about the fine-tuning run it prepares.

    Attributes:
        batch_size: the training batch size.
        lr: the training learning rate (LoRA-SB's η is derived from it).
        num_train: ``N``, the number of training examples (LoRA-DA's variance term).
        warmup_ratio: LoRA-SB's repo formula ``η_eff = lr / (warmup_ratio · #batches · epochs)``.
        loss_fn: ``loss_fn(model, ids) -> scalar``; a causal-LM loss by default.
    """

    batch_size: int
    lr: float
    num_train: int
    warmup_ratio: float = 0.02
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = causal_lm_loss

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_train / self.batch_size)


def target_layers(model, names: list[str]) -> dict[str, torch.nn.Linear]:
    """Targeted linear layers, keyed as PEFT will name them (``base_model.model.`` + name)."""
    return {
        f"base_model.model.{n}": m for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names
    }


def _only_targets_require_grad(model, targets: dict[str, torch.nn.Linear]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)


def gradient_sign_update(model, batches: list[torch.Tensor], target_names: list[str], eta: float,
                         loss_fn=causal_lm_loss) -> dict[str, LoraSBStats]:
    """LoRA-SB's ``ΔW = -η·sign(Σ_b ∇(loss_b/|b|))`` per targeted layer (docs/initializers.md §3 step 4)."""
    targets = target_layers(model, target_names)
    _only_targets_require_grad(model, targets)
    sums = {k: torch.zeros_like(m.weight, dtype=torch.float32) for k, m in targets.items()}
    for ids in batches:
        model.zero_grad(set_to_none=True)
        (loss_fn(model, ids) / ids.shape[0]).backward()
        for k, m in targets.items():
            sums[k] += m.weight.grad.float()
    model.zero_grad(set_to_none=True)
    return {k: LoraSBStats.from_gradient_sum(g, eta) for k, g in sums.items()}


def kfac_statistics(model, blocks: torch.Tensor, target_names: list[str], num_train: int,
                    loss_fn=causal_lm_loss) -> tuple[dict[str, LoraDAStats], int]:
    """LoRA-DA's mean gradient, K-FAC input factor and diagonal output factor, batch size 1.

    One pass computes all three: the spec's two passes run over the same samples
    (fisher_offset 0), so the gradient pass and the factor pass see identical inputs.
    Returns the statistics per layer and the number of tokens ``T``.
    """
    targets = target_layers(model, target_names)
    _only_targets_require_grad(model, targets)
    device = next(model.parameters()).device
    grads = {k: torch.zeros_like(m.weight, dtype=torch.float32) for k, m in targets.items()}
    z = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=device) for k, m in targets.items()}
    y2 = {k: torch.zeros(m.out_features, dtype=torch.float32, device=device) for k, m in targets.items()}
    tokens = 0
    handles = []
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
            loss_fn(model, ids).backward()  # L_j: the sample's mean token loss
            tokens += ids.numel()
            for k, m in targets.items():
                grads[k] += m.weight.grad.float()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    n = len(blocks)
    stats = {
        k: LoraDAStats(grad=grads[k] / n, input_factor=z[k] / tokens, output_factor=y2[k] / tokens, num_train=num_train)
        for k in targets
    }
    return stats, tokens


def collect_lora_sb(model, blocks: torch.Tensor, target_names: list[str], ctx: CollectContext
                    ) -> tuple[dict[str, LoraSBStats], dict[str, Any]]:
    """The LoRA-SB statistics kind's collector: ``blocks`` in batches of ``ctx.batch_size``.

    η_eff by the repo's formula (docs/initializers.md §3 resolution b, a documented quirk): the lr over
    warm-up ratio times the number of batches of one epoch of the train set.
    """
    eta = LoraSBStats.eta_from_repo(ctx.lr, ctx.warmup_ratio, ctx.batches_per_epoch)
    batches = [blocks[i : i + ctx.batch_size] for i in range(0, len(blocks), ctx.batch_size)]
    return gradient_sign_update(model, batches, target_names, eta, ctx.loss_fn), {"eta_eff": eta}


def collect_lora_da(model, blocks: torch.Tensor, target_names: list[str], ctx: CollectContext
                    ) -> tuple[dict[str, LoraDAStats], dict[str, Any]]:
    """The LoRA-DA statistics kind's collector: one sample at a time (docs/initializers.md §4)."""
    stats, tokens = kfac_statistics(model, blocks, target_names, ctx.num_train, ctx.loss_fn)
    return stats, {"tokens": tokens, "num_train": ctx.num_train}


class GradientOracle(Protocol):
    """A layer whose loss gradients are known without a model pass: a synthetic layer-level
    task (``bench.layer``) answers the statistics passes' questions directly.

    Gradients are those of the per-sample loss at the base weight ``W`` (before any adapter),
    as a statistics pass sees them.
    """

    def gradient_sum(self, batches: int, batch_size: int) -> torch.Tensor:
        """``Σ_b ∇_W (mean loss of batch b)`` over ``batches`` batches (m x n)."""

    def kfac(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """LoRA-DA's ``(G, Z, y², T)`` over ``tokens`` samples at batch size 1 (docs/initializers.md §4
        steps 1-2): mean gradient (m x n), input factor (n x n), output factor (m,), and
        the number of tokens they came from (0: exact expectations)."""


def lora_sb_from_oracle(oracle: GradientOracle, ctx: CollectContext, samples: int
                        ) -> tuple[LoraSBStats, dict[str, Any]]:
    """LoRA-SB's ``ΔW = -η·sign(Σ∇W)`` (docs/initializers.md §3 step 4) from ``samples`` inputs in batches
    of ``ctx.batch_size``, η_eff by the repo's formula as :func:`collect_lora_sb` uses it."""
    eta = LoraSBStats.eta_from_repo(ctx.lr, ctx.warmup_ratio, ctx.batches_per_epoch)
    batches = max(1, math.ceil(samples / ctx.batch_size))
    stats = LoraSBStats.from_gradient_sum(oracle.gradient_sum(batches, ctx.batch_size), eta)
    return stats, {"eta_eff": eta, "samples": batches * ctx.batch_size}


def lora_da_from_oracle(oracle: GradientOracle, ctx: CollectContext, samples: int
                        ) -> tuple[LoraDAStats, dict[str, Any]]:
    """LoRA-DA's mean gradient and K-FAC factors (docs/initializers.md §4 steps 1-2) over ``samples`` tokens."""
    grad, z, y2, tokens = oracle.kfac(samples)
    return LoraDAStats(grad=grad, input_factor=z, output_factor=y2, num_train=ctx.num_train), {
        "tokens": tokens, "num_train": ctx.num_train}
