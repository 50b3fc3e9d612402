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

    def validate(self, shape: tuple[int, int], *, finite: bool = True) -> None:
        """The update's shape and dtype; and that it is finite, unless the caller's own pass
        over it checks that (``finite=False``: :func:`loram_ref.lora_sb.lora_sb`'s norm)."""
        check_shape(self.update, shape, "stats.update", finite=finite)

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


@dataclass(frozen=True)
class GradientStats:
    """The mean gradient ``G = (1/N) Σ_j ∇_W L_j`` over N samples (m x n, PyTorch orientation),
    ``L_j`` a sample's mean token loss: what LoRA-GA and LoRA-One read (docs/initializers.md §6).
    It is the same quantity as LoRA-DA's ``G`` and, up to its positive scale, the gradient sum
    whose sign is LoRA-SB's update: one statistics pass serves all four."""

    grad: torch.Tensor
    samples: int = 0

    def validate(self, shape: tuple[int, int]) -> None:
        check_shape(self.grad, shape, "stats.grad")
        if self.samples < 0:
            raise ValueError(f"stats.samples must be >= 0, got {self.samples}")

    @classmethod
    def synthetic(cls, m: int, n: int, generator: torch.Generator, device="cpu") -> "GradientStats":
        """A Gaussian mean gradient plus a rank-4 component (a gradient has a few strong
        directions: docs/initializers.md §6), scale 1e-3."""
        low = torch.randn(m, 4, generator=generator, device=device) @ torch.randn(4, n, generator=generator,
                                                                                  device=device)
        grad = torch.randn(m, n, generator=generator, device=device).add_(low, alpha=0.5).mul_(1e-3)
        return cls(grad=grad, samples=0)


@dataclass(frozen=True)
class InputCovarianceStats:
    """A layer's input covariance ``C`` (n x n), what CorDA reads (docs/initializers.md §6).

    PEFT's ``preprocess_corda`` builds it per forward call of one sample as ``X̃ᵀX̃`` with
    ``X̃ = X / |max X|`` (the sample's activations divided by their largest value) and
    averages over the calls; ``loram_ref.statistics.moments`` computes that in the shared
    pass (``"input_peak"``). CorDA's factors' product ``B·A`` does not depend on C's overall
    scale, only on its shape.
    """

    covariance: torch.Tensor
    samples: int = 0

    def validate(self, shape: tuple[int, int]) -> None:
        n = shape[1]
        check_shape(self.covariance, (n, n), "stats.covariance")

    @classmethod
    def synthetic(cls, m: int, n: int, generator: torch.Generator, device="cpu") -> "InputCovarianceStats":
        """The second moment of at most 512 Gaussian inputs with a decaying scale per coordinate
        (rank-deficient when n > 512: the damping of docs/initializers.md §6 then matters)."""
        tokens = min(2 * n, 512)
        scale = torch.logspace(0, -2, n, device=device)
        x = torch.randn(tokens, n, generator=generator, device=device).mul_(scale)
        return cls(covariance=(x.mT @ x).div_(tokens), samples=tokens)


@dataclass(frozen=True)
class InputMomentsStats:
    """A layer's input moments over T tokens: ``M = (1/T) Σ_t x_t x_tᵀ`` (n x n) and
    ``μ = (1/T) Σ_t x_t`` (n): what EVA reads (docs/initializers.md §6). EVA's components
    are the top eigenvectors of the centred covariance ``M − μμᵀ``; the singular values of
    the centred data matrix are ``√(T·λ)``. ``M`` is LoRA-DA's K-FAC input factor ``Z``."""

    second_moment: torch.Tensor
    mean: torch.Tensor
    tokens: int

    def validate(self, shape: tuple[int, int]) -> None:
        n = shape[1]
        check_shape(self.second_moment, (n, n), "stats.second_moment")
        check_shape(self.mean, (n,), "stats.mean")
        check_positive_int(self.tokens, "stats.tokens")

    @classmethod
    def synthetic(cls, m: int, n: int, generator: torch.Generator, device="cpu") -> "InputMomentsStats":
        """Moments of at most 512 Gaussian inputs with a decaying scale per coordinate and a small mean."""
        tokens = min(2 * n, 512)
        scale = torch.logspace(0, -2, n, device=device)
        x = torch.randn(tokens, n, generator=generator, device=device).mul_(scale).add_(0.01)
        return cls(second_moment=(x.mT @ x).div_(tokens), mean=x.mean(0), tokens=tokens)
