"""CorDA: context-oriented decomposition adaptation (docs/initializers.md §6; Yang et al. 2024, arXiv 2406.05223; PEFT corda_init)."""

from __future__ import annotations

import torch

from .residual import finish, work_copy
from .registry import FULL_SVD, Invariant, Statistics, register
from .result import LoraInit
from .statistics.types import InputCovarianceStats
from .validation import check_inputs
from .work import Work, svd_flops

MODES = ("ipm", "kpm")
#: PEFT's damping schedule: λ = 0.01, doubled until ‖C'·C'⁻¹ − I‖_F < 0.05
DAMP_START, INVERSE_TOLERANCE, MAX_DOUBLINGS = 0.01, 0.05, 40


def corda_work(m: int, n: int, r: int, itemsize: int) -> Work:
    """``C'⁻¹`` (≈ 2·n³ with its check), ``W·C'`` (2·m·n²), the full SVD of the m x n product
    (≈ 4·m·n·k + 8·k³, k = min(m, n)), ``Vᵀ·C'⁻¹`` (2·k·n²) and the residual."""
    k = min(m, n)
    flops = 2.0 * n**3 + 2.0 * m * n * n + svd_flops(m, n) + 2.0 * k * n * n + 2.0 * m * n * r
    return Work(read_bytes=m * n * itemsize + n * n * 4, rw_bytes=3 * m * n * 4 + 2 * n * n * 4, flops=flops,
                gemm="square")


def damped_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(C', C'⁻¹, λ)`` with ``C' = C + λ·mean(diag C)·I``, λ doubled from 0.01 until the
    inverse is accurate (PEFT ``collect_eigens_for_layer``, the same operations in its order)."""
    n = cov.shape[0]
    eye = torch.eye(n, device=cov.device)
    damp = DAMP_START
    for _ in range(MAX_DOUBLINGS):
        fixed = cov + torch.diag(torch.ones(n, device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < INVERSE_TOLERANCE:
            return fixed, inverse, damp
        damp *= 2
    raise ValueError(f"corda: the input covariance stays singular after damping it by {damp:g}·mean(diag C); check "
                     "the statistics (a covariance of all-zero inputs has mean(diag C) = 0)")


@register(
    "corda",
    harness=("inplace", "check_input"),
    work=corda_work,
    invariant=Invariant.FUNCTION_PRESERVING,
    statistics=Statistics.INPUT_COVARIANCE,
    cost=FULL_SVD,
    peft_name='"corda" (corda_method="ipm" | "kpm")',
    decomposition="full SVD of W·C (C the damped input covariance)",
    label="CorDA",
    paper="Yang et al. 2024, CorDA (arXiv 2406.05223); PEFT corda_init",
    summary="SVD of W·C' = UΣV̂ᵀ, V = C'⁻¹V̂; top-r (ipm) or bottom-r (kpm) triplets in A, B; W_res = W - s·B·A",
)
def corda(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    stats: InputCovarianceStats | None = None,
    mode: str = "ipm",
    inplace: bool = False,
    check_input: bool = True,
) -> LoraInit:
    """CorDA (PEFT ``init_lora_weights="corda"``), docs/initializers.md §6.

    ``C' = C + λ·mean(diag C)·I`` (:func:`damped_inverse`); ``W·C' = U·diag(Σ)·V̂ᵀ`` (fp32
    full SVD) and ``V = (V̂ᵀ·C'⁻¹)ᵀ``, so ``U·diag(Σ)·Vᵀ = W`` up to the inverse's error.
    ``mode="ipm"`` (instruction-previewed) keeps the r largest triplets, ``"kpm"``
    (knowledge-preserved) the r smallest. ``A = diag(√(Σ_r/s))·V_rᵀ``,
    ``B = U_r·diag(√(Σ_r/s))`` and ``W_res = W − s·B·A`` in fp32, cast once: invariant (F).

    ``B·A`` does not depend on C's overall scale (only the split of that scale between A and
    B does), so what matters is the covariance's shape; the statistics pass builds it as
    PEFT does (``InputCovarianceStats``).
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(stats, InputCovarianceStats):
        raise TypeError(f"stats must be an InputCovarianceStats (the layer's input covariance), got "
                        f"{type(stats).__name__}")
    stats.validate(tuple(weight.shape))
    if rank > min(weight.shape):
        raise ValueError(f"corda requires rank <= min(d_out, d_in) = {min(weight.shape)}, got {rank}")
    work = work_copy(weight, inplace)
    cov = stats.covariance.to(device=weight.device, dtype=work.dtype)
    fixed, inverse, damp = damped_inverse(cov)
    u, s, vh = torch.linalg.svd(work @ fixed, full_matrices=False)
    v = (vh @ inverse).transpose(0, 1)
    keep = slice(0, rank) if mode == "ipm" else slice(-rank, None)
    u_r, s_r, v_r = u[:, keep].clone(), s[keep].clone(), v[:, keep].clone()
    del u, s, vh, v, fixed, inverse
    s_r /= scaling
    a = v_r.t().mul(s_r.sqrt().view(-1, 1)).contiguous()  # A = √(Σ_r/s)·V_rᵀ
    b = u_r.mul(s_r.sqrt()).contiguous()  # B = U_r·√(Σ_r/s)
    work.sub_(scaling * b @ a)  # W_res = W − s·B·A, in fp32, in W's copy
    residual = finish(work, weight, inplace, "corda")
    return LoraInit(method="corda", A=a.to(weight.dtype), B=b.to(weight.dtype), scaling=scaling, residual=residual,
                    info={"mode": mode, "damping": damp})
