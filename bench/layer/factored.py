"""Training one adapter on the layer task without ever forming an m x n matrix.

The normalized error (1: no progress, 0: the target reached)

    L(t) = ‖(W_eff(t) − W − ΔW*)·Σ^½‖_F² / ‖ΔW*·Σ^½‖_F²

is a function of low-rank factors only. With ``P = B·M`` (``M = R`` for LoRA-SB, else the
identity) and ``P₀, A₀`` the factors at step 0:

* an initializer that keeps the function (invariants F and Z: ``W_res = W − s·P₀·A₀``) has
  ``W_eff(t) − W = s·(P − P₀)·A + s·P₀·(A − A₀)``: exactly 0 at step 0, so ``L(0) = 1``;
* a shifted one (invariant S: ``W`` unchanged) has ``W_eff(t) − W = s·P·A``.

So ``W_eff(t) − W − ΔW* = Lf·Rfᵀ`` with ``c = 2r + k`` (or ``r + k``) columns, and
``‖Lf·Rfᵀ·Σ^½‖² = Σ (LfᵀLf) ∘ (Rfᵀ·Σ·Rf)``: O((m+n)·c²) work and memory per step
(exact gradients), or O((m+n)·c·b) for a mini-batch of ``b`` sampled inputs, where the
loss is ``‖Lf·(Rfᵀ·X)‖²/b``, whose expectation is the exact loss. Gradients are autograd's
through these expressions; the optimizer is the model-level benchmark's (AdamW, no weight
decay, constant lr).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch._dynamo  # noqa: F401  (AdamW's constructor imports it: 1.3 s per cold worker unless the fork server has it)

from bench.layer.problem import Target
from loram_ref.linalg import gram_norm_sq


@dataclass
class AdapterState:
    """The trainable factors and their step-0 copies.

    ``middle`` is LoRA-SB's R (then only R trains; A and B are frozen), else None (A and B
    train, or only A where ``train_b`` is False: MiCA). ``preserves_function``: the
    initializer rewrote W so that W_eff(0) = W.
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    preserves_function: bool
    middle: torch.Tensor | None = None
    train_b: bool = True
    a0: torch.Tensor = field(init=False)
    p0: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.a = self.a.detach().float().clone()
        self.b = self.b.detach().float().clone()
        if self.middle is not None:
            self.middle = self.middle.detach().float().clone().requires_grad_(True)
        else:
            self.a.requires_grad_(True)
            self.b.requires_grad_(self.train_b)
        self.a0 = self.a.detach().clone()
        self.p0 = self.product_left().detach().clone()

    @property
    def parameters(self) -> list[torch.Tensor]:
        if self.middle is not None:
            return [self.middle]
        return [self.a, self.b] if self.train_b else [self.a]

    @property
    def only_a(self) -> bool:
        """Only A trains (B frozen, no middle factor): MiCA."""
        return self.middle is None and not self.train_b

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def product_left(self) -> torch.Tensor:
        """``P = B·M`` (m x r)."""
        return self.b @ self.middle if self.middle is not None else self.b

    def change_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_eff(t) − W_eff(0) = s·(P − P₀)·A + s·P₀·(A − A₀)`` as ``(m x 2r, n x 2r)`` factors."""
        p, s = self.product_left(), self.scaling
        return torch.cat([(p - self.p0) * s, self.p0 * s], 1), torch.cat([self.a.mT, (self.a - self.a0).mT], 1)

    def error_factors(self, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_eff(t) − W − ΔW* = Lf·Rfᵀ`` (see the module docstring)."""
        if self.preserves_function:
            left, right = self.change_factors()
        else:
            left, right = self.product_left() * self.scaling, self.a.mT
        return torch.cat([left, -target.left], 1), torch.cat([right, target.right], 1)


def target_norm_sq(target: Target, input_var: torch.Tensor) -> float:
    """``‖ΔW*·Σ^½‖_F²``, the normalizer of the loss."""
    return float(gram_norm_sq(target.left.double(), target.right.double(), input_var.double()))


def exact_loss(state: AdapterState, target: Target, input_var: torch.Tensor, norm_sq: float) -> torch.Tensor:
    left, right = state.error_factors(target)
    return gram_norm_sq(left, right, input_var) / norm_sq


def sampled_loss(state: AdapterState, target: Target, x: torch.Tensor, norm_sq: float) -> torch.Tensor:
    """``‖(W_eff − W − ΔW*)·X‖²/b / ‖ΔW*·Σ^½‖²`` for inputs ``X`` (n x b): unbiased for :func:`exact_loss`."""
    left, right = state.error_factors(target)
    return (left @ (right.mT @ x)).square().sum() / (x.shape[1] * norm_sq)


def update_norm(state: AdapterState) -> float:
    """``‖W_eff(t) − W_eff(0)‖_F``, in float64 from the factors."""
    with torch.no_grad():
        left, right = state.change_factors()
        return math.sqrt(max(0.0, float(gram_norm_sq(left.double(), right.double()))))


@dataclass
class LayerCurve:
    """Per-step records of one run: ``loss[t]`` and ``update_norm[t]`` after ``t`` steps
    (``t = 0..steps``), ``train_loss[t-1]`` the mini-batch loss step ``t`` trained on
    (sampled gradients only)."""

    loss: list[float] = field(default_factory=list)
    update_norm: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    diverged_step: int = 0

    def auc(self) -> float:
        """The mean of the loss over steps 0..T (trapezoids): lower means it got low sooner."""
        if self.diverged_step or len(self.loss) < 2:
            return math.nan
        values = self.loss
        return sum((a + b) / 2 for a, b in zip(values, values[1:])) / (len(values) - 1)


def train_layer(state: AdapterState, target: Target, input_var: torch.Tensor, *, steps: int, lr: float,
                batch_size: int = 0, generator: torch.Generator | None = None,
                sample=None) -> LayerCurve:
    """AdamW (no weight decay, constant lr) for ``steps`` steps on exact gradients
    (``batch_size=0``) or on mini-batches of ``batch_size`` inputs from ``sample(count, generator)``.

    The recorded loss is always the exact normalized error. On exact gradients the loss a
    step trains on *is* the loss after the previous step, so each step evaluates it once
    (its forward serves both) and one more evaluation after the last step gives ``L(T)``.
    In sampled mode the mini-batch estimate the step trained on is kept as ``train_loss``
    and the exact loss is evaluated apart. A non-finite loss ends the run
    (``diverged_step``: the first step after which the loss was not finite).
    """
    norm_sq = target_norm_sq(target, input_var)
    optimizer = torch.optim.AdamW(state.parameters, lr=lr, weight_decay=0.0)
    curve = LayerCurve()
    curve.update_norm.append(0.0)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        if batch_size:
            loss = sampled_loss(state, target, sample(batch_size, generator), norm_sq)
            with torch.no_grad():
                before = float(exact_loss(state, target, input_var, norm_sq))
        else:
            loss = exact_loss(state, target, input_var, norm_sq)
            before = float(loss.detach())
        value = float(loss.detach())
        if not (math.isfinite(value) and math.isfinite(before)):
            curve.diverged_step = max(1, step - 1)
            return curve
        curve.loss.append(before)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.step_seconds.append(time.perf_counter() - t0)
        if batch_size:
            curve.train_loss.append(value)
        curve.update_norm.append(update_norm(state))
    with torch.no_grad():
        after = float(exact_loss(state, target, input_var, norm_sq))
    if not math.isfinite(after):
        curve.diverged_step = max(1, steps)
        return curve
    curve.loss.append(after)
    return curve
