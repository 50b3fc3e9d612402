"""Each data-aware initializer's layer statistics, from the sums of the one statistics pass
they share (``.moments``) or from a layer task's gradient oracle, as the papers define them,
on an ``nn.Module`` whose targeted ``nn.Linear`` layers are named by their last path component:

* LoRA-SB (docs/initializers.md §3 "Data statistic"): ``ΔW = -η·sign(Σ_j ∇L_j)``, Adam's first
  step from zero moments (the sign of the batch-mean gradients' sum, for batches of one size).
* LoRA-DA (docs/initializers.md §4 steps 1-2): the mean gradient ``G``, the K-FAC input factor
  ``Z = (1/T) Σ_t x_t x_tᵀ`` and the diagonal output factor ``y² = (1/T) Σ_t (∂L_j/∂y_t)²``.
* LoRA-GA and LoRA-One (§6): the mean gradient ``G``.
* CorDA (§6): the input covariance as PEFT builds it (each sample scaled by its largest input).
* EVA (§6): the input moments ``Σxxᵀ/T`` and ``Σx/T``.

Only the targeted linear weights keep gradients. Timing and peak memory of a pass are
the benchmark's business (``bench.loss.stats_pass``), not this module's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from .moments import LayerMoments, collect_moments
from .types import GradientStats, InputCovarianceStats, InputMomentsStats, LoraDAStats, LoraSBStats


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


def gradient_sign_update(model, batches: list[torch.Tensor], target_names: list[str], eta: float,
                         loss_fn=causal_lm_loss) -> dict[str, LoraSBStats]:
    """LoRA-SB's ``ΔW = -η·sign(Σ∇W)`` per targeted layer (docs/initializers.md §3 step 4) over
    ``batches`` (blocks of one length, batches of one size: the sign of the batch-mean
    gradients' sum is that of the per-sample sum the shared pass accumulates)."""
    blocks = torch.cat(list(batches))
    moments = collect_moments(model, blocks, target_layers(model, target_names), {"grad"},
                              batch_size=len(batches[0]), loss_fn=loss_fn)[len(blocks)]
    return {k: LoraSBStats.from_gradient_sum(v.grad_sum, eta) for k, v in moments.items()}


def kfac_statistics(model, blocks: torch.Tensor, target_names: list[str], num_train: int,
                    loss_fn=causal_lm_loss, batch_size: int = 1) -> tuple[dict[str, LoraDAStats], int]:
    """LoRA-DA's mean gradient, K-FAC input factor and diagonal output factor (docs/initializers.md §4
    steps 1-2), from one pass of the shared statistics pass (``.moments``).

    The spec's two passes run over the same samples (fisher_offset 0), so one pass computes
    all three. Returns the statistics per layer and the number of tokens ``T``.
    """
    moments = collect_moments(model, blocks, target_layers(model, target_names), LORA_DA_NEEDS,
                              batch_size=batch_size, loss_fn=loss_fn)[len(blocks)]
    stats = {k: lora_da_from_moments(v, num_train) for k, v in moments.items()}
    return stats, next(iter(moments.values())).tokens if moments else 0


#: What each kind reads from the shared pass (``.moments.NEEDS``).
LORA_SB_NEEDS = frozenset({"grad"})
LORA_DA_NEEDS = frozenset({"grad", "input", "output"})
GRADIENT_NEEDS = frozenset({"grad"})
CORDA_NEEDS = frozenset({"input_peak"})
EVA_NEEDS = frozenset({"input"})


def lora_sb_from_moments(moments: LayerMoments, ctx: CollectContext) -> tuple[LoraSBStats, dict[str, Any]]:
    """``ΔW = -η·sign(Σ_j ∇L_j)`` with η by the repo's formula (docs/initializers.md §3 resolution b,
    a documented quirk: the lr over warm-up ratio times the batches of one epoch)."""
    moments.require("grad_sum")
    eta = LoraSBStats.eta_from_repo(ctx.lr, ctx.warmup_ratio, ctx.batches_per_epoch)
    return LoraSBStats.from_gradient_sum(moments.grad_sum, eta), {"eta_eff": eta}


def lora_da_from_moments(moments: LayerMoments, num_train: int) -> LoraDAStats:
    """``G = Σ∇L_j/N``, ``Z = Σxxᵀ/T``, ``y² = Σ(∂L_j/∂y)²/T`` (docs/initializers.md §4 steps 1-2)."""
    moments.require("grad_sum", "input_sq", "output_sq")
    return LoraDAStats(grad=moments.grad_sum / moments.samples, input_factor=moments.input_sq / moments.tokens,
                       output_factor=moments.output_sq / moments.tokens, num_train=num_train)


def gradient_from_moments(moments: LayerMoments, ctx: CollectContext) -> tuple[GradientStats, dict[str, Any]]:
    """LoRA-GA's and LoRA-One's mean gradient ``G = Σ_j ∇L_j / N`` (docs/initializers.md §6)."""
    moments.require("grad_sum")
    return GradientStats(grad=moments.grad_sum / moments.samples, samples=moments.samples), {
        "samples": moments.samples}


def corda_from_moments(moments: LayerMoments, ctx: CollectContext) -> tuple[InputCovarianceStats, dict[str, Any]]:
    """CorDA's covariance as PEFT builds it: the mean over samples of ``X̃ᵀX̃``, ``X̃ = X/|max X|``."""
    moments.require("input_peak_sq")
    return InputCovarianceStats(covariance=moments.input_peak_sq / moments.samples, samples=moments.samples), {
        "samples": moments.samples, "tokens": moments.tokens}


def eva_from_moments(moments: LayerMoments, ctx: CollectContext) -> tuple[InputMomentsStats, dict[str, Any]]:
    """EVA's input moments ``M = Σxxᵀ/T`` and ``μ = Σx/T`` (docs/initializers.md §6)."""
    moments.require("input_sq", "input_sum")
    t = moments.tokens
    return InputMomentsStats(second_moment=moments.input_sq / t, mean=moments.input_sum / t, tokens=t), {
        "tokens": t}


def collect_lora_sb(model, blocks: torch.Tensor, target_names: list[str], ctx: CollectContext
                    ) -> tuple[dict[str, LoraSBStats], dict[str, Any]]:
    """The LoRA-SB statistics kind's collector on its own: ``blocks`` in batches of ``ctx.batch_size``."""
    moments = collect_moments(model, blocks, target_layers(model, target_names), LORA_SB_NEEDS,
                              batch_size=ctx.batch_size, loss_fn=ctx.loss_fn)[len(blocks)]
    out = {k: lora_sb_from_moments(v, ctx) for k, v in moments.items()}
    return {k: v[0] for k, v in out.items()}, next(iter(out.values()))[1] if out else {}


def collect_lora_da(model, blocks: torch.Tensor, target_names: list[str], ctx: CollectContext
                    ) -> tuple[dict[str, LoraDAStats], dict[str, Any]]:
    """The LoRA-DA statistics kind's collector on its own (docs/initializers.md §4)."""
    stats, tokens = kfac_statistics(model, blocks, target_names, ctx.num_train, ctx.loss_fn, ctx.batch_size)
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


def gradient_from_oracle(oracle: GradientOracle, ctx: CollectContext, samples: int
                         ) -> tuple[GradientStats, dict[str, Any]]:
    """The mean gradient over ``samples`` inputs (one batch of them) from a layer task."""
    samples = max(1, samples)
    return GradientStats(grad=oracle.gradient_sum(1, samples), samples=samples), {"samples": samples}


def corda_from_oracle(oracle: GradientOracle, ctx: CollectContext, samples: int
                      ) -> tuple[InputCovarianceStats, dict[str, Any]]:
    """CorDA's covariance from a layer task: its input second moment ``Z`` (the layer task's
    inputs are single tokens, so PEFT's division of a sample by its largest value is a
    per-token rescaling this task does not model)."""
    _, z, _, tokens = oracle.kfac(samples)
    return InputCovarianceStats(covariance=z, samples=tokens), {"tokens": tokens}


def eva_from_oracle(oracle: GradientOracle, ctx: CollectContext, samples: int
                    ) -> tuple[InputMomentsStats, dict[str, Any]]:
    """EVA's moments from a layer task: ``M = Z``, ``μ = 0`` (its inputs have mean zero)."""
    _, z, _, tokens = oracle.kfac(samples)
    return InputMomentsStats(second_moment=z, mean=torch.zeros(z.shape[0], device=z.device), tokens=max(tokens, 1)), {
        "tokens": tokens}
