"""PiSSA: principal singular values and vectors adaptation (docs/initializers.md §2; Meng et al. 2024, arXiv 2404.02948)."""

from __future__ import annotations

from typing import Any

import torch

from .fidelity import angle_deg, orthonormal_rows
from .krylov import DEPTH, PRECISE_DEPTH, TOLERANCE, certified_top_triplets, least_passes
from .linalg import randomized_svd
from .stream import compute_dtype
from .registry import FULL_SVD, Invariant, PublishedScaling, register
from .result import LoraInit
from .work import Work, full_svd, randomized_svd_work
from .residual import finish, streamed_residual, work_copy
from .validation import check_inputs, check_positive_int, check_scaling, check_shape, resolve_generator

_PAPER = "Meng, Wang & Zhang 2024, PiSSA (arXiv 2404.02948); PEFT pissa_init"


def _split_triplets(u_r: torch.Tensor, s_r: torch.Tensor, vh_r: torch.Tensor, scaling: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §2 steps 3-4, in place on ``vh_r`` and ``u_r``: ``(A, B)``."""
    root = torch.sqrt(s_r / scaling)  # step 3: σ'_r = σ_r / s; each factor carries √σ'
    a = vh_r.mul_(root[:, None])  # step 4: A = diag(√σ'_r)·V_rᵀ  (r x n)
    b = u_r.mul_(root[None, :])  # step 4: B = U_r·diag(√σ'_r)  (m x r)
    return a, b


def pissa_from_svd(u_r: torch.Tensor, s_r: torch.Tensor, vh_r: torch.Tensor, scaling: float = 1.0) -> LoraInit:
    """PiSSA's factors from W's top-r singular triplets when they are already known.

    The same steps 3-4 as :func:`pissa` (``A = diag(√(σ_r/s))·V_rᵀ``, ``B = U_r·diag(√(σ_r/s))``)
    on triplets the caller knows exactly, e.g. because it built ``W = U·diag(σ)·Vᵀ + bulk``
    with the bulk orthogonal to ``U`` and ``V`` (``bench.layer.problem``), where the full SVD
    of a 70B-shaped W would take minutes. ``residual`` is ``None``: the caller knows
    ``W_res = W − s·B·A`` as well as the factors do (invariant (F) by construction). Up to
    the sign of each triplet, which SVD routines choose freely, the factors are those of
    :func:`pissa` on that W (tested).
    """
    scaling = check_scaling(scaling)
    if not isinstance(s_r, torch.Tensor) or s_r.dim() != 1 or s_r.numel() < 1:
        raise ValueError("s_r must be a 1-D tensor of the r top singular values")
    r = s_r.numel()
    check_shape(s_r, (r,), "s_r")
    if bool((s_r < 0).any()):
        raise ValueError("s_r must be >= 0: singular values are never negative")
    check_shape(vh_r, (r, vh_r.shape[-1]), "vh_r")
    check_shape(u_r, (u_r.shape[0], r), "u_r")
    a, b = _split_triplets(u_r.clone(), s_r.clone(), vh_r.clone(), scaling)
    return LoraInit(method="pissa", A=a, B=b, scaling=scaling, info={"svd": "known"})


def _pissa_factors(
    name: str,
    weight: torch.Tensor,
    work: torch.Tensor,
    u_r: torch.Tensor,
    s_r: torch.Tensor,
    vh_r: torch.Tensor,
    scaling: float,
    inplace: bool,
    info: dict,
) -> LoraInit:
    """Spec §2 steps 3-5 from the top-r triplets of the fp32 ``work`` copy of ``W``."""
    a, b = _split_triplets(u_r, s_r, vh_r, scaling)
    work.addmm_(b, a, alpha=-scaling)  # step 5: W_res = W - s·B·A, in fp32 (fp64), in place
    residual = finish(work, weight, inplace, name)
    return LoraInit(
        method=name,
        A=a.to(weight.dtype),
        B=b.to(weight.dtype),
        scaling=scaling,
        residual=residual,
        info=info,
    )


def _pissa_streamed(
    name: str,
    weight: torch.Tensor,
    u_r: torch.Tensor,
    s_r: torch.Tensor,
    vh_r: torch.Tensor,
    scaling: float,
    inplace: bool,
    info: dict,
) -> LoraInit:
    """Spec §2 steps 3-5 from W's top-r triplets in the compute dtype, with no fp32 copy of
    ``W``: the residual is written one up-cast row block at a time
    (:func:`loram_ref.residual.streamed_residual`)."""
    a, b = _split_triplets(u_r, s_r, vh_r, scaling)
    residual = streamed_residual(weight, b, a, scaling, inplace, name)  # step 5, block by block
    return LoraInit(method=name, A=a.to(weight.dtype), B=b.to(weight.dtype), scaling=scaling, residual=residual,
                    info=info)


#: Niters at which pissa_rsvd's subspace is compared with the exact one (its fidelity diagnostic).
NITERS = (0, 2, 4, 16)


def pissa_rsvd_fidelity(weight: torch.Tensor, rank: int, init: LoraInit, kwargs: dict[str, Any]) -> dict[str, float]:
    """Largest angle (°) to the exact top-r right singular subspace, per niter in :data:`NITERS`."""
    work = weight.double() if weight.dtype == torch.float64 else weight.float()
    exact = torch.linalg.svd(work, full_matrices=False).Vh[:rank].mT
    seed = int(kwargs.get("seed", 0))
    out = {}
    for niter in NITERS:
        gen = torch.Generator(device=weight.device).manual_seed(seed)
        _, _, v = randomized_svd(work, rank, niter, gen)
        out[f"angle_deg_niter{niter}"] = angle_deg(v, exact)
    out["angle_deg"] = angle_deg(orthonormal_rows(init.A), exact)
    return out


@register(
    "pissa",
    harness=("inplace", "check_input"),
    work=full_svd,
    invariant=Invariant.FUNCTION_PRESERVING,
    published=PublishedScaling(source="the PiSSA paper sets lora_alpha = r (s = 1; docs/initializers.md §2)"),
    cost=FULL_SVD,
    from_svd=pissa_from_svd,
    peft_name='"pissa"',
    decomposition="full SVD of W",
    label="full-SVD PiSSA",
    paper=_PAPER,
    summary="top-r SVD triplets of W (full SVD) in A, B; W_res = W - U_r Σ_r V_rᵀ",
)
def pissa(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    inplace: bool = False,
    check_input: bool = True,
) -> LoraInit:
    """PiSSA with a full economy SVD (PEFT ``init_lora_weights="pissa"``), docs/initializers.md §2.

    ``W = U·diag(σ)·Vᵀ`` (fp32, ``torch.linalg.svd(full_matrices=False)``);
    ``A = diag(√(σ_r/s))·V_rᵀ``, ``B = U_r·diag(√(σ_r/s))``, ``W_res = W - s·B·A``.
    Invariant (F): ``W_res + s·B·A = W`` whatever the SVD's accuracy.

    Decisions: the residual is computed in fp32 from the fp32 factors and cast to
    ``W``'s dtype once, and ``A``/``B`` are returned in ``W``'s dtype, PEFT's order of
    operations (docs/initializers.md §2 resolution c). Extra memory is what the SVD needs: the fp32
    copy of ``W`` (reused as the residual), ``U`` and ``Vᵀ`` (docs/initializers.md §2 "Cost").

    Args:
        inplace: allow writing the residual into ``weight``'s storage (then
            ``result.residual is weight`` for fp32, or shares its storage).
        check_input: reject NaN/Inf in ``W`` before decomposing.
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    return _pissa_full_svd("pissa", weight, rank, scaling, inplace, {"svd": "full"})


def _pissa_full_svd(name: str, weight: torch.Tensor, rank: int, scaling: float, inplace: bool, info: dict) -> LoraInit:
    """Spec §2 with the full economy SVD of the fp32 work copy of W."""
    work = work_copy(weight, inplace)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    u_r, s_r, vh_r = u[:, :rank].clone(), s[:rank].clone(), vh[:rank].clone()
    del u, s, vh
    return _pissa_factors(name, weight, work, u_r, s_r, vh_r, scaling, inplace, info)


def krylov_work(m: int, n: int, r: int, itemsize: int) -> Work:
    """The least a certified run does: the fp32 cycle and the float64 cycle of
    ``loram_ref.krylov`` (:func:`loram_ref.krylov.least_passes` reads of W, each a rank-2r
    product; the float64 ones counted twice), then the residual. A run that cannot certify
    adds a full SVD (the cost class is the full SVD's: the harness's Gaussian weights have
    a flat spectrum, where it always falls back)."""
    fp32_products = 2 * DEPTH + 2
    fp64_products = least_passes() - fp32_products
    return Work(read_bytes=least_passes() * m * n * itemsize, rw_bytes=2 * m * n * itemsize,
                flops=(fp32_products + 2 * fp64_products) * 2.0 * m * n * 2 * r + 2.0 * m * n * r, gemm="projection")


@register(
    "pissa_krylov",
    harness=("generator", "inplace", "check_input"),
    work=krylov_work,
    invariant=Invariant.FUNCTION_PRESERVING,
    published=PublishedScaling(source="the PiSSA paper sets lora_alpha = r (s = 1; docs/initializers.md §2)"),
    cost=FULL_SVD,
    from_svd=pissa_from_svd,
    decomposition="W's top-r SVD triplets by restarted block Krylov, certified (Wedin's bound); full SVD when "
                  "it cannot certify",
    label="PiSSA, certified Krylov",
    paper=_PAPER,
    summary="full-SVD PiSSA's factors from a certified top-r solver: no full SVD on a decaying spectrum",
)
def pissa_krylov(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    tol: float = TOLERANCE,
    max_passes: int | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
    inplace: bool = False,
    check_input: bool = True,
) -> LoraInit:
    """Full-SVD PiSSA (:func:`pissa`, PEFT ``init_lora_weights="pissa"``) with W's top-r
    triplets from :func:`loram_ref.krylov.certified_top_triplets` (docs/initializers.md §2
    "Exact PiSSA without the full SVD").

    Where the solver certifies that the largest principal angle between its top-r singular
    subspaces and the exact ones is at most ``tol`` (radians), the factors are PiSSA's
    steps 3-5 on its triplets, and the residual is written block by block (no fp32 copy of
    W): the same factors as :func:`pissa` up to that angle and the sign of each triplet
    (which SVD routines choose freely; ``s·B·A`` does not depend on it). Where it cannot
    (a flat spectrum, σ_r ≈ σ_{r+1}, a budget of ``max_passes`` products spent, or a layer
    too narrow for a Krylov basis to pay: min(m, n) < 1408 at r = 16), the factors are
    :func:`pissa`'s from a full SVD. ``info`` says which (``svd``: ``krylov`` or ``full``)
    and why, with the certificate (``krylov_angle_bound``, ``krylov_residual``,
    ``krylov_gap``, ``krylov_passes`` ...). Invariant (F) holds either way.
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    gen = resolve_generator(generator, weight.device, seed)
    u, s, v, certificate = certified_top_triplets(weight, rank, gen, tol=tol, max_passes=max_passes)
    info = {"svd": "krylov" if certificate.certified else "full", **certificate.info()}
    if not certificate.certified:
        return _pissa_full_svd("pissa_krylov", weight, rank, scaling, inplace, info)
    dtype = compute_dtype(weight.dtype)
    return _pissa_streamed("pissa_krylov", weight, u.to(dtype), s.to(dtype), v.mT.to(dtype).contiguous(), scaling,
                           inplace, info)


@register(
    "pissa_rsvd",
    harness=("generator", "inplace", "check_input"),
    work=randomized_svd_work(4),
    fidelity=pissa_rsvd_fidelity,
    peft_name='"pissa_niter_4"',
    decomposition="randomized SVD of W (q = r, niter iterations)",
    invariant=Invariant.FUNCTION_PRESERVING,
    published=PublishedScaling(source="the PiSSA paper sets lora_alpha = r (s = 1; docs/initializers.md §2)"),
    paper=_PAPER,
    summary="PiSSA on a randomized SVD (q = r, niter power iterations)",
)
def pissa_rsvd(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    niter: int = 4,
    generator: torch.Generator | None = None,
    seed: int = 0,
    inplace: bool = False,
    check_input: bool = True,
) -> LoraInit:
    """PiSSA with a randomized SVD (PEFT ``init_lora_weights="pissa_niter_N"``), docs/initializers.md §2.

    The top-r triplets come from :func:`loram_ref.linalg.randomized_svd` with ``q = r``
    (no oversampling, as PEFT: docs/initializers.md §2 resolution a) and ``niter`` subspace iterations;
    the rest is as :func:`pissa`. A generator in the state of the global RNG reproduces
    PEFT's ``torch.svd_lowrank`` draw. Default ``niter=4`` is the PiSSA authors' example
    (the training scripts use 16). Invariant (F) holds exactly; only the subspace is
    approximate.

    Memory: the decomposition only multiplies by W, so W is read in row blocks, each
    up-cast to fp32 in one reused buffer (``2·niter + 2`` reads), and the residual is
    written block by block (:func:`loram_ref.residual.streamed_residual`): extra memory
    O((m+n)·r) plus one block, never an fp32 copy of W. The arithmetic is PEFT's fp32
    arithmetic on the exactly up-cast W; only the order of the fp32 sums differs from one
    GEMM over the whole matrix.
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    niter = check_positive_int(niter, "niter", minimum=0)
    gen = resolve_generator(generator, weight.device, seed)
    u_r, s_r, v_r = randomized_svd(weight, rank, niter, gen)  # W streamed in up-cast row blocks: no fp32 copy
    return _pissa_streamed("pissa_rsvd", weight, u_r, s_r, v_r.mT.contiguous(), scaling, inplace,
                           {"svd": "randomized", "niter": niter, "oversampling": 0})
