"""The layer-level task: a frozen weight of one layer's shape, a target update and an input covariance.

One problem per (layer shape, seed), shared by every initializer, alignment and learning
rate of that seed (a paired design):

* ``W = U_t·diag(σ)·V_tᵀ + P_U⊥·G·P_V⊥``: a Marchenko-Pastur bulk (``G`` with i.i.d.
  ``N(0, 1/n)`` entries, ``nn.Linear``'s scale, singular values up to the edge
  ``1 + √(m/n)``) plus ``t`` top singular values ``σ_i = edge·(1 + κ·i^{-p})`` above it.
  The bulk is projected off the top directions *and* off ``t`` further directions
  ``U_b, V_b``, so the top triplets are exactly ``(U_t, σ, V_t)`` (PiSSA's full SVD is
  known without computing it) and ``(U_b, 0, V_b)`` are exact bottom singular pairs.
  W depends on the shape and ``spec.weight_part()`` only (its own ``weight_seed``): every
  seed, target rank and target scale of a shape sees the same W, so an initializer that
  reads W alone is called once per shape.
* ``ΔW* = L·Rᵀ`` of rank ``k`` with singular values ``τ_j ∝ j^{-q}``, scaled to
  ``‖ΔW*‖_F = target_scale · E‖W‖_F``, in one of three subspaces (the *alignment*):
  W's top-k singular subspace (``aligned``), W's bottom (null) directions (``bottom``),
  or a Haar-random one (``random``), drawn from the run's seed. Within the subspace the target's own singular
  vectors are a random rotation, not W's.
* ``Σ = diag(λ)``: isotropic (λ = 1) or a decaying spectrum ``λ_i ∝ i^{-d}`` (mean 1) in
  the coordinate basis, which is a random basis relative to W's and the target's.

Only :meth:`LayerProblem.weight` makes an m x n matrix (for the initializers, which read
W); everything training needs is O((m+n)·k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.core.weights import SpikedWeight, orthonormal as _orthonormal, stable_seed
from bench.layer.spec import ALIGNMENTS, ProblemSpec

__all__ = ["LayerProblem", "Target", "TaskGradients"]


@dataclass
class Target:
    """``ΔW* = left·rightᵀ`` (m x k, n x k); ``right`` has orthonormal columns."""

    left: torch.Tensor
    right: torch.Tensor
    alignment: str

    def to(self, device: torch.device | str) -> "Target":
        return Target(self.left.to(device), self.right.to(device), self.alignment)

    def dense(self) -> torch.Tensor:
        """The m x n matrix (tests and small shapes only)."""
        return self.left @ self.right.mT


class LayerProblem:
    """The task of one layer shape and seed. Cheap to build: the m x n weight is made only on request."""

    def __init__(self, m: int, n: int, seed: int, spec: ProblemSpec = ProblemSpec(), device: str | torch.device = "cpu"):
        spec.validate(m, n)
        self.m, self.n, self.seed, self.spec = int(m), int(n), int(seed), spec
        self.device = torch.device(device)
        self._weight = SpikedWeight(m, n, spec.top_directions, spec.top_strength, spec.top_decay, spec.weight_seed)
        self.u_top, self.u_bottom = self._weight.u_top, self._weight.u_bottom
        self.v_top, self.v_bottom = self._weight.v_top, self._weight.v_bottom
        self.edge, self.s_top = self._weight.edge, self._weight.s_top
        if spec.input_spectrum == "isotropic":
            self.input_var = torch.ones(n)
        else:
            lam = torch.arange(1, n + 1, dtype=torch.float64).pow(-spec.input_decay)
            self.input_var = (lam * (n / lam.sum())).float()  # mean 1: tr Σ = n
        self.weight_norm = self._weight.expected_norm  # E‖W‖_F

    # -- the frozen weight -------------------------------------------------------------
    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W`` (m x n) on the problem's device (``bench.core.weights.SpikedWeight``). O(m·n·(t+k))
        work; the only m x n matrix of the task."""
        return self._weight.dense(dtype, self.device)

    def top_triplets(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W's exact top-``rank`` singular triplets ``(U_r, σ_r, V_rᵀ)``."""
        if rank > self.spec.top_directions:
            raise ValueError(f"rank {rank} exceeds the {self.spec.top_directions} known top directions")
        return (self.u_top[:, :rank].to(self.device), self.s_top[:rank].to(self.device),
                self.v_top[:, :rank].mT.contiguous().to(self.device))

    # -- the target ----------------------------------------------------------------------
    def target(self, alignment: str) -> Target:
        """``ΔW*`` in the subspace named by ``alignment`` (see the module docstring)."""
        if alignment not in ALIGNMENTS:
            raise ValueError(f"--alignment must be one of {', '.join(ALIGNMENTS)}, got {alignment!r}")
        k = self.spec.target_rank
        gen = torch.Generator().manual_seed(stable_seed("target", self.m, self.n, self.seed, alignment, k))
        if alignment == "aligned":
            u, v = self.u_top[:, :k], self.v_top[:, :k]
        elif alignment == "bottom":
            u, v = self.u_bottom[:, :k], self.v_bottom[:, :k]
        else:
            u, v = _orthonormal(self.m, k, gen), _orthonormal(self.n, k, gen)
        # the target's singular vectors: a random rotation within the subspace
        u = u @ _orthonormal(k, k, gen)
        v = v @ _orthonormal(k, k, gen)
        tau = torch.arange(1, k + 1, dtype=torch.float64).pow(-self.spec.target_decay)
        tau = (tau * (self.spec.target_scale * self.weight_norm / float(tau.norm()))).float()
        return Target(left=(u * tau[None, :]).contiguous(), right=v.contiguous(), alignment=alignment).to(self.device)

    # -- inputs --------------------------------------------------------------------------
    def inputs(self, count: int, gen: torch.Generator) -> torch.Tensor:
        """``count`` inputs ``x ~ N(0, Σ)`` as the columns of an n x count matrix."""
        x = torch.randn(self.n, count, generator=gen, device=self.device)
        return x.mul_(self.input_var.to(self.device).sqrt()[:, None])

    def generator(self, purpose: str) -> torch.Generator:
        """A generator for one purpose ("batches", "statistics") of this problem's seed: the
        same draws for every initializer (the batches of a seed are shared)."""
        return torch.Generator(device=self.device).manual_seed(stable_seed(purpose, self.m, self.n, self.seed))

    def oracle(self, target: Target, exact: bool) -> "TaskGradients":
        return TaskGradients(self, target, exact)


@dataclass
class TaskGradients:
    """The task's gradients at the base weight, for the data-aware initializers' statistics
    (a ``loram_ref.statistics.collect.GradientOracle``).

    Per sample the loss is ``ℓ(x) = ‖(W_eff − W − ΔW*)·x‖²``; at ``W_eff = W`` its gradient
    is ``−2·ΔW*·x·xᵀ`` and its output gradient ``−2·ΔW*·x``. ``exact``: expectations over
    ``x ~ N(0, Σ)``; else averages over inputs drawn from the problem's "statistics" stream.
    """

    problem: LayerProblem
    target: Target
    exact: bool

    def _exact_gradient(self) -> torch.Tensor:
        lam = self.problem.input_var.to(self.target.right.device)
        return (self.target.left @ (self.target.right * lam[:, None]).mT).mul_(-2.0)  # −2·ΔW*·Σ

    def gradient_sum(self, batches: int, batch_size: int) -> torch.Tensor:
        """``Σ_b ∇_W (mean ℓ over batch b)``."""
        if self.exact:
            return self._exact_gradient().mul_(batches)
        gen = self.problem.generator("statistics")
        acc = torch.zeros(self.target.right.shape[1], self.problem.n, device=self.target.right.device)
        for _ in range(batches):
            x = self.problem.inputs(batch_size, gen)
            acc.addmm_(self.target.right.mT @ x, x.mT, alpha=1.0 / batch_size)  # Σ_b (ΔW* ... ) in k x n
        return (self.target.left @ acc).mul_(-2.0)

    def kfac(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Mean gradient ``G``, input factor ``Z = E[x·xᵀ]``, output factor ``y² = E[(−2·ΔW*·x)²]``."""
        left, right = self.target.left, self.target.right
        if self.exact:
            lam = self.problem.input_var.to(right.device)
            z = torch.diag(lam)
            middle = (right * lam[:, None]).mT @ right  # Rᵀ·Σ·R (k x k)
            return self._exact_gradient(), z, ((left @ middle) * left).sum(1).mul_(4.0), 0
        gen = self.problem.generator("statistics")
        x = self.problem.inputs(tokens, gen)
        proj = right.mT @ x  # k x T
        z = (x @ x.mT).div_(tokens)
        grad = (left @ (proj @ x.mT)).mul_(-2.0 / tokens)
        y2 = ((left @ (proj @ proj.mT).div_(tokens)) * left).sum(1).mul_(4.0)
        return grad, z, y2, tokens
