"""The minor singular triplets of W: MiLoRA (W rewritten, as PiSSA but at the bottom of the
spectrum) and MiCA (B = the minor left vectors, A = 0, only A trains); docs/initializers.md §6."""

from __future__ import annotations

import torch

from .pissa import _pissa_factors
from .residual import work_copy
from .registry import FULL_SVD, Invariant, register
from .result import LoraInit
from .validation import check_inputs
from .work import Work, full_svd, svd_flops


def _check_rank_fits(weight: torch.Tensor, rank: int, name: str) -> None:
    if rank > min(weight.shape):
        raise ValueError(f"{name} requires rank <= min(d_out, d_in) = {min(weight.shape)} (W has no more singular "
                         f"triplets), got rank {rank}")


def mica_work(m: int, n: int, r: int, itemsize: int) -> Work:
    """A full SVD for U (``torch.linalg.svd``, :func:`svd_flops`), no residual."""
    return Work(read_bytes=m * n * itemsize, rw_bytes=m * n * 4, flops=svd_flops(m, n), gemm="square")


@register(
    "milora",
    harness=("inplace", "check_input"),
    work=full_svd,
    invariant=Invariant.FUNCTION_PRESERVING,
    cost=FULL_SVD,
    decomposition="full SVD of W (last r triplets)",
    label="MiLoRA",
    paper="Wang et al. 2025, MiLoRA (NAACL 2025, arXiv 2406.09044)",
    summary="last-r SVD triplets of W in A, B (√σ on each side); W_res = W - U_min Σ_min V_minᵀ",
)
def milora(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    inplace: bool = False,
    check_input: bool = True,
) -> LoraInit:
    """MiLoRA, docs/initializers.md §6: PiSSA's construction on the r *smallest* triplets.

    ``W = U·diag(σ)·Vᵀ`` (fp32 economy SVD); with ``U_min, σ_min, V_min`` the last r
    triplets in the SVD's (descending) order, ``A = diag(√(σ_min/s))·V_minᵀ``,
    ``B = U_min·diag(√(σ_min/s))`` and ``W_res = W − s·B·A = W − U_min·Σ_min·V_minᵀ``.
    Invariant (F). The scaling is folded into the factors as PiSSA does, so the residual is
    the same for every s. A randomized SVD cannot find the minor triplets cheaply, so this
    needs the full SVD (cost class FULL_SVD).
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    _check_rank_fits(weight, rank, "milora")
    work = work_copy(weight, inplace)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    u_r, s_r, vh_r = u[:, -rank:].clone(), s[-rank:].clone(), vh[-rank:].clone()
    del u, s, vh
    return _pissa_factors("milora", weight, work, u_r, s_r, vh_r, scaling, inplace,
                          {"svd": "full", "sigma_min_kept": float(s_r[-1]), "sigma_max_kept": float(s_r[0])})


@register(
    "mica",
    harness=("check_input",),
    work=mica_work,
    invariant=Invariant.ZERO_PRODUCT,
    cost=FULL_SVD,
    trains=("A",),
    peft_name='"mica"',
    decomposition="full SVD of W (last r left vectors)",
    label="MiCA",
    paper="MiCA, minor component adaptation (arXiv 2604.01694); PEFT mica_init",
    summary="B = the last r left singular vectors of W (frozen), A = 0 (trains); W unchanged",
)
def mica(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    check_input: bool = True,
) -> LoraInit:
    """PEFT's ``init_lora_weights="mica"``, docs/initializers.md §6.

    ``U`` of the fp32 economy SVD of W; ``B = U[:, −r:]`` (the left singular vectors of the
    r smallest singular values), ``A = 0``. Invariant (Z): ``B·A = 0`` and W unchanged. Only
    A trains (the registry's ``trains``; PEFT freezes B), so every update is confined to the
    span of W's minor left singular vectors. The scaling is not used by the init.
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    _check_rank_fits(weight, rank, "mica")
    work = weight.double() if weight.dtype == torch.float64 else weight.to(torch.float32)
    u = torch.linalg.svd(work, full_matrices=False).U
    b = u[:, -rank:].contiguous()
    a = torch.zeros(rank, weight.shape[1], dtype=weight.dtype, device=weight.device)
    return LoraInit(method="mica", A=a, B=b.to(weight.dtype), scaling=scaling, info={"svd": "full"})
