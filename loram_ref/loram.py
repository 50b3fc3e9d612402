"""LoRAM: magnitude-driven initialization on a fixed basis (docs/initializers.md §5; Zhang et al., arXiv 2507.06558, NeurIPS 2025)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .bases import dst_basis, random_orthogonal_basis
from .registry import Invariant, PublishedScaling, register
from .result import LoraInit
from .work import one_pass_residual
from .guard import check_residual
from .validation import check_inputs, resolve_generator, squared_norm

_PAPER = "Zhang et al. 2025, The Primacy of Magnitude in Low-Rank Adaptation (LoRAM, arXiv 2507.06558)"


def loram_gain(weight_sq_norm: float, shape: tuple[int, int], rank: int) -> tuple[float, float]:
    """LoRAM's gain ``Q[r]`` and amplitude ``β`` (paper Eq. 11-12; docs/initializers.md §5 "Gain").

    ``Q = ln r / ln min(d_out, d_in)``. With orthonormal bases ``ν[Φ_out Φ_inᵀ] = r/(m·n)``
    exactly, so ``β = (Q·ν[W]/ν[ΦΦᵀ])^{1/4}`` reduces to ``β = (Q·‖W‖_F²/r)^{1/4}`` and
    ``‖β²·Φ_out Φ_inᵀ‖_F = √Q·‖W‖_F``.
    """
    gain = math.log(rank) / math.log(min(shape))
    beta = (gain * weight_sq_norm / rank) ** 0.25
    return gain, beta


#: The error for an all-zero W.
ZERO_WEIGHT = ("weight is all zeros: LoRAM's amplitude β = (Q·‖W‖²/r)^¼ is 0, which gives a dead adapter (A = B = 0, both "
               "gradients vanish); use a noise-zeros initializer for a zero weight")

#: Elements per up-cast block of an fp16 norm pass (:func:`loram_ref.validation.squared_norm`;
#: the other dtypes take one row-norm kernel): few enough blocks that a passive OpenMP pool's
#: wake-ups do not add up (4 Mi: 56 blocks at 28672 x 8192).
NORM_BLOCK_ELEMENTS = 1 << 22


def _basis_dtype(weight: object) -> torch.dtype:
    """Bases in float64 for a float64 W (so its factors keep float64 precision), else float32."""
    return torch.float64 if isinstance(weight, torch.Tensor) and weight.dtype == torch.float64 else torch.float32


def loram_factors(sq_norm: float, shape: tuple[int, int], rank: int, phi_in: torch.Tensor, phi_out: torch.Tensor,
                  dtype: torch.dtype, gain_multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``A = β·Φ_inᵀ``, ``B = β·Φ_out`` (paper Algorithm 1), with ``Q`` and ``β`` from ``‖W‖_F²``.

    ``phi_in``/``phi_out`` may be any rows of the bases (a shard's, ``loram_ref.sharded``);
    they are scaled in place. ``gain_multiplier`` ``c`` scales the amplitude to ``c·β`` (1:
    the paper's; the loss benchmarks vary it to test the magnitude argument by
    intervention). Returns ``(A, B, Q, c·β)`` with the factors in ``dtype``.
    """
    if not (isinstance(gain_multiplier, (int, float)) and math.isfinite(gain_multiplier) and gain_multiplier > 0):
        raise ValueError(f"gain_multiplier must be finite and > 0 (1: the paper's β), got {gain_multiplier!r}")
    gain, beta = loram_gain(sq_norm, shape, rank)
    beta *= float(gain_multiplier)
    a = phi_in.mT.mul_(beta).to(dtype).contiguous()  # A = β·Φ_inᵀ   (r x d_in)
    b = phi_out.mul_(beta).to(dtype)  # B = β·Φ_out   (d_out x r)
    return a, b, gain, beta


def subtract_update(residual: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, sq_norm: float,
                    name: str) -> None:
    """``W_res = W − s·B·A`` in place on ``residual`` (paper Eq. 1 with α = s), proven finite.

    One in-place GEMM from the factors as returned, so ``W_res + s·B·A`` reproduces ``W`` up
    to one rounding of ``W_res`` in ``W``'s dtype. ``|W_res_ij| <= ‖W‖_F + s·max_i‖B_i‖·
    max_j‖A_j‖`` (Cauchy-Schwarz): only a bound near the dtype's limit (fp16 at 65504)
    needs the pass that proves the residual finite. Works on any block of ``W`` with its
    rows of ``B`` and columns of ``A`` (a shard's).
    """
    residual.addmm_(b, a, alpha=-scaling)
    if residual.numel() == 0:  # an empty shard (more ranks than rows)
        return
    bound = math.sqrt(sq_norm) + scaling * float(b.float().norm(dim=1).max()) * float(a.float().norm(dim=0).max())
    if bound >= 0.5 * torch.finfo(residual.dtype).max:
        check_residual(residual, name)  # an overflow is an error, never a silent Inf


def _loram(
    name: str,
    weight: torch.Tensor,
    rank: int,
    scaling: float,
    inplace: bool,
    basis: Callable[[int], torch.Tensor],
    info: dict,
    gain_multiplier: float = 1.0,
) -> LoraInit:
    # r = 1 gives Q = 0, β = 0: a dead adapter (docs/initializers.md §5); NaN/Inf are caught by the norm pass
    scaling = check_inputs(weight, rank, scaling, check_input=False, min_rank=2)
    m, n = weight.shape
    # pass 1 over W (also the NaN/Inf check): its row norms, no up-cast copy
    sq_norm = squared_norm(weight, block_elements=max(rank * (m + n), NORM_BLOCK_ELEMENTS))
    if sq_norm == 0.0:
        raise ValueError(ZERO_WEIGHT)
    a, b, gain, beta = loram_factors(sq_norm, (m, n), rank, basis(n), basis(m), weight.dtype, gain_multiplier)
    residual = weight if inplace else weight.clone()
    subtract_update(residual, a, b, scaling, sq_norm, name)
    return LoraInit(
        method=name,
        A=a,
        B=b,
        scaling=scaling,
        residual=residual,
        info={**info, "gain_Q": gain, "beta": beta, "gain_multiplier": float(gain_multiplier)},
    )


@register(
    "loram_dst",
    harness=("inplace",),
    work=one_pass_residual,
    invariant=Invariant.FUNCTION_PRESERVING,
    published=PublishedScaling(source="the paper fixes s = 1 (docs/initializers.md §5)"),
    paper=_PAPER,
    decomposition="none (an analytic DST-I basis)",
    summary="A = β·Φ_inᵀ, B = β·Φ_out on the first r DST-I columns, β = (Q‖W‖²/r)^¼; W_res = W - s·B·A",
)
def loram_dst(weight: torch.Tensor, rank: int, scaling: float = 1.0, *, inplace: bool = False,
              gain_multiplier: float = 1.0) -> LoraInit:
    """LoRAM with the deterministic DST-I basis (paper Algorithm 1; docs/initializers.md §5 "Pseudocode").

    ``Φ_d`` = first r columns of the orthonormal DST-I of size d, ``Q = ln r/ln min(m, n)``,
    ``β = (Q·‖W‖_F²/r)^{1/4}``, ``A = β·Φ_inᵀ``, ``B = β·Φ_out``, ``W_res = W - s·B·A``.
    Invariant (F); ``BᵀB = AAᵀ = β²I``; ``‖s·B·A‖_F = s·√Q·‖W‖_F``.

    Decisions:
        * ``s`` is not divided into the factors: the paper fixes s = 1 and treats s as a
          separate magnitude knob (Prop. 1; docs/initializers.md §5 step 4). The residual uses the given s.
        * ``ν`` is the paper's mean square, not ``torch.var`` (docs/initializers.md §5 "Dtype").
        * ``rank >= 2`` is required: r = 1 makes Q = 0 and both factors zero.
        * Memory: ``‖W‖_F²`` is the float64 sum of W's squared row norms (one kernel that
          reads W at the read bandwidth; an fp16 ``W`` is up-cast one block at a time,
          never whole) and the residual is one in-place ``addmm_``; with ``inplace=True``
          the extra memory is the O((m+n)·r) bases and factors (and an fp16 block). Passes over ``W``: one read
          for the norm and one read and write for the residual (the rank-r GEMM): the
          hardware floor of the method. A NaN/Inf in ``W`` is caught by the norm pass, an
          all-zero ``W`` is refused (β = 0), and where the entry bound ‖W‖_F + s·max‖B_i‖·
          max‖A_j‖ comes near the dtype's limit (fp16) one more read proves the residual
          finite; an overflow is an error.
        * ``gain_multiplier`` ``c`` (default 1, the paper's) gives ``A = c·β·Φ_inᵀ``,
          ``B = c·β·Φ_out``: the update magnitude as a factor the benchmarks intervene on.
    """
    return _loram(
        "loram_dst", weight, rank, scaling, inplace,
        lambda d: dst_basis(d, rank, dtype=_basis_dtype(weight), device=weight.device),
        {"basis": "dst-I"}, gain_multiplier,
    )


@register(
    "loram_rorth",
    harness=("generator", "inplace"),
    work=one_pass_residual,
    invariant=Invariant.FUNCTION_PRESERVING,
    published=PublishedScaling(source="the paper fixes s = 1 (docs/initializers.md §5)"),
    paper=_PAPER + ", §4.3 basis ablation",
    decomposition="QR of two Gaussian d x r blocks",
    summary="LoRAM with Haar random-orthogonal bases instead of DST (same β)",
)
def loram_rorth(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
    inplace: bool = False,
    gain_multiplier: float = 1.0,
) -> LoraInit:
    """LoRAM's random-orthogonal basis ablation (paper §4.3; docs/initializers.md §5 "Variants").

    Φ_in and Φ_out are Haar-random orthonormal ``d x r`` matrices (QR of a Gaussian with
    the sign fix; input side drawn first, then output side). Because ``ν[ΦΦᵀ] = r/(mn)``
    for any orthonormal basis, β is identical to :func:`loram_dst`, and so are the
    invariants and memory behaviour; ``gain_multiplier`` as in :func:`loram_dst`.
    """
    gen = resolve_generator(generator, weight.device, seed) if isinstance(weight, torch.Tensor) else None
    return _loram(
        "loram_rorth", weight, rank, scaling, inplace,
        lambda d: random_orthogonal_basis(d, rank, gen, dtype=_basis_dtype(weight), device=weight.device),
        {"basis": "random-orthogonal"}, gain_multiplier,
    )
