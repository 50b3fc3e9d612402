"""Layer statistics the data-aware initializers consume, and synthetic stand-ins for them.

Collecting these from a model and data is the loss benchmark's job (``bench.loss``);
the initializers themselves are pure linear algebra on one layer (issue #3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_positive_int, check_shape


@dataclass(frozen=True)
class LoraSBStats:
    """LoRA-SB's update approximation ``ΔW`` (m x n, PyTorch orientation), docs/initializers.md §3.

    Build it with :meth:`from_gradient_sum` from the accumulated base-model gradient, as
    the official code does, or pass any update estimate directly.
    """

    update: torch.Tensor

    @classmethod
    def from_gradient_sum(cls, grad_sum: torch.Tensor, eta_eff: float) -> "LoraSBStats":
        """``ΔW = -η_eff · sign(Σ∇W)``: Adam's first step from zero moments (docs/initializers.md §3 step 4)."""
        if not eta_eff > 0:
            raise ValueError(f"eta_eff must be > 0, got {eta_eff}")
        return cls(update=torch.sign(grad_sum).mul_(-eta_eff).to(torch.float32))

    @staticmethod
    def eta_from_repo(lr: float, warmup_ratio: float, init_batches: int, epochs: int = 1) -> float:
        """The repo's ``η_eff = lr / (warmup_ratio · #init-loader-batches · epochs)`` (docs/initializers.md §3 quirk)."""
        if not (lr > 0 and warmup_ratio > 0 and init_batches > 0 and epochs > 0):
            raise ValueError("lr, warmup_ratio, init_batches and epochs must all be > 0")
        return lr / (warmup_ratio * init_batches * epochs)

    def validate(self, shape: tuple[int, int]) -> None:
        check_shape(self.update, shape, "stats.update")

    @classmethod
    def synthetic(cls, m: int, n: int, generator: torch.Generator, eta_eff: float = 3.0e-7, device="cpu") -> "LoraSBStats":
        """A sign-of-Gaussian update of the right shape and scale, for tests and timing."""
        g = torch.randn(m, n, generator=generator, device=device)
        return cls.from_gradient_sum(g, eta_eff)


@dataclass(frozen=True)
class LoraDAStats:
    """LoRA-DA's per-layer statistics (docs/initializers.md §4, PyTorch orientation, W is m x n).

    Attributes:
        grad: mean gradient ``G = mean_j ∇_W L_j`` (m x n).
        input_factor: K-FAC input factor ``Z = (1/T) Σ_t x_t x_tᵀ`` (n x n), undamped.
        output_factor: diagonal output factor ``y² = (1/T) Σ_t (∂L/∂y_t)²`` (m,).
        num_train: ``N``, the size of the whole fine-tuning set (not the 256 samples).
    """

    grad: torch.Tensor
    input_factor: torch.Tensor
    output_factor: torch.Tensor
    num_train: int

    def validate(self, shape: tuple[int, int]) -> None:
        m, n = shape
        check_shape(self.grad, (m, n), "stats.grad")
        check_shape(self.input_factor, (n, n), "stats.input_factor")
        check_shape(self.output_factor, (m,), "stats.output_factor")
        if bool((self.output_factor < 0).any()):
            raise ValueError("stats.output_factor must be >= 0 (it is a mean of squares)")
        check_positive_int(self.num_train, "stats.num_train")

    @classmethod
    def synthetic(
        cls, m: int, n: int, generator: torch.Generator, tokens: int | None = None, num_train: int = 100_000, device="cpu"
    ) -> "LoraDAStats":
        """Statistics of the right shapes and structure from random activations and gradients.

        ``Z`` is the second moment of ``tokens`` Gaussian inputs (PSD, full rank when
        ``tokens >= n``), ``y²`` the mean square of Gaussian output gradients, ``G`` a
        small Gaussian mean gradient.
        """
        tokens = tokens or 2 * n
        x = torch.randn(tokens, n, generator=generator, device=device)
        z = (x.mT @ x).div_(tokens)
        del x
        y2 = torch.randn(m, generator=generator, device=device).square_().mul_(1e-4)
        grad = torch.randn(m, n, generator=generator, device=device).mul_(1e-3)
        return cls(grad=grad, input_factor=z, output_factor=y2, num_train=num_train)
