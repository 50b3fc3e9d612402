"""LoRA-SB: optimal initialization of the LoRA-XS middle matrix (docs/initializers.md §3; Ponkshe, Singhal et al., arXiv 2411.19557)."""

from __future__ import annotations

import math
from dataclasses import replace

from typing import Any

import torch

from .linalg import randomized_svd
from .registry import Invariant, PublishedScaling, Statistics, register
from .result import LoraInit
from .work import sign_update_rsvd
from .statistics.types import LoraSBStats
from .validation import check_inputs, check_positive_int, resolve_generator, squared_norm


def _rescaled(init: LoraInit, factor: float) -> LoraInit:
    """LoRA-SB for the update ``factor·ΔW``: the same A and B, ``R·factor``.

    The randomized SVD is homogeneous: with the same test matrix, ``rsvd(c·ΔWᵀ)`` has the
    same subspaces and ``c·σ`` (its QR steps normalize the scale away), so ``R = diag(c·σ)/s``.
    Only the bf16 rounding of R differs from a fresh call (round(c·σ) against c·round(σ):
    at most 2⁻⁸ relative per entry; tested).
    """
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be finite and > 0, got {factor}")
    info = {**init.info, "rescaled_by": factor}
    if "sigma_1" in info:
        info["sigma_1"] = info["sigma_1"] * factor
    return replace(init, R=(init.R.float() * factor).to(init.R.dtype), info=info)


def lora_sb_fidelity(weight: torch.Tensor, rank: int, init: LoraInit, kwargs: dict[str, Any]) -> dict[str, float]:
    """Captured energy of the factors against the Eckart–Young optimum of the update."""
    update = kwargs["stats"].update.double()
    total = float(update.square().sum())
    if total == 0.0:
        return {}
    b, a = init.B.double(), init.A.double()
    captured = float((b.mT @ update @ a.mT).square().sum()) / total
    optimum = float(torch.linalg.svdvals(update)[:rank].square().sum()) / total
    return {"captured_energy": captured, "optimal_energy": optimum, "energy_ratio": captured / optimum if optimum else 1.0}


@register(
    "lora_sb",
    harness=("generator", "check_input"),
    rescale=_rescaled,
    work=sign_update_rsvd,
    fidelity=lora_sb_fidelity,
    invariant=Invariant.SHIFTED,
    statistics=Statistics.LORA_SB,
    trains=("R",),
    decomposition="randomized SVD of −η·sign(Σ∇W) (q = r, 10 iterations)",
    published=PublishedScaling(source="the official repo forces lora_alpha = r (s = 1; docs/initializers.md §3)"),
    paper="Ponkshe, Singhal et al. 2024, LoRA-SB (arXiv 2411.19557); CERT-Lab/lora-sb",
    summary="B, A = top-r singular vectors of -η·sign(Σ∇W), trainable R = Σ_r/s; W unchanged",
)
def lora_sb(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    stats: LoraSBStats | None = None,
    niter: int = 10,
    generator: torch.Generator | None = None,
    seed: int = 42,
    round_bf16: bool = True,
    official_draw: bool = True,
    check_input: bool = True,
) -> LoraInit:
    """LoRA-SB (docs/initializers.md §3 "Initialization"): ``W_eff = W + s·B·R·A`` with A, B frozen.

    1. ``P, σ, Q = rsvd(ΔWᵀ, q=r, niter=10)`` so ``ΔW ≈ Q·diag(σ)·Pᵀ`` (docs/initializers.md §3 step 3).
    2. ``B = Q`` (m x r, left singular vectors of ΔW), ``A = Pᵀ`` (r x n),
       ``R = diag(σ)/s`` (docs/initializers.md §3 steps 5-6), so ``s·B·R·A = [ΔW]_r``, the best rank-r
       approximation of the update (Eckart-Young), up to the randomized SVD's accuracy.
    3. ``W`` is not modified (docs/initializers.md §3 step 8, resolution c): invariant (S).

    What it reproduces: the official ``get_svd_grad`` (CERT-Lab/lora-sb,
    ``utils/svd_utils.py``) seeds the global RNG with 42, draws one throw-away Gaussian
    ``d_out x r`` matrix it never uses, and only then calls ``torch.svd_lowrank(ΔWᵀ, q=r,
    niter=10)``, whose test matrix is therefore the *second* draw after seeding (docs/initializers.md §3
    step 2, corrected). With ``official_draw=True`` (default) we make the same throw-away
    draw from a local generator seeded with 42, on W's device, so A, B and R equal the
    official ones for the same update (bit for bit on CPU in our tests). This matters: on
    the flat spectra of sign updates 10 subspace iterations with q = r do not converge,
    and a different test matrix gives a different subspace with the same captured energy
    (the products differed by 85-127 % without the draw). ``official_draw=False`` skips
    it (the first release's behaviour).

    Decisions:
        * The official code calls ``torch.manual_seed(42)`` per module; we draw from a
          local generator seeded with 42 instead (resolution e): the same stream, no side
          effect on the global RNG.
        * ``round_bf16=True`` replicates the code's rounding of P, σ, Q to bf16
          ("faithful" mode, resolution d); ``False`` keeps fp32 ("clean" mode).
        * Factors are returned in ``W``'s dtype (the code casts to the gradient's dtype,
          which is the model's).

    Args:
        stats: the update approximation, see :class:`loram_ref.statistics.LoraSBStats`.
        niter: subspace iterations of the randomized SVD (code: 10).
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    niter = check_positive_int(niter, "niter", minimum=0)
    if not isinstance(stats, LoraSBStats):
        raise TypeError(f"stats must be a LoraSBStats (the update approximation), got {type(stats).__name__}")
    stats.validate(tuple(weight.shape), finite=False)
    update = stats.update.to(device=weight.device)  # any float dtype: the SVD up-casts it block by block
    update_sq_norm = squared_norm(update, "stats.update")  # ‖ΔW‖², one read; also the NaN/Inf check
    gen = resolve_generator(generator, weight.device, seed)
    if official_draw:  # the official code's unused R = torch.randn(d_out, r) before svd_lowrank
        torch.randn(weight.shape[0], rank, generator=gen, device=weight.device, dtype=torch.float32)
    p, sigma, q = randomized_svd(update.mT, rank, niter, gen)  # ΔWᵀ ≈ P diag(σ) Qᵀ
    b, a, r = q, p.mT, torch.diag(sigma / scaling)
    if round_bf16:
        b, a, r = (t.to(torch.bfloat16) for t in (b, a, r))
    return LoraInit(
        method="lora_sb",
        A=a.to(weight.dtype).contiguous(),
        B=b.to(weight.dtype).contiguous(),
        R=r.to(weight.dtype),
        scaling=scaling,
        info={"niter": niter, "round_bf16": round_bf16, "official_draw": official_draw, "sigma_1": float(sigma[0]),
              "captured_energy": float(sigma.double().square().sum()) / max(update_sq_norm, 1e-300)},
    )
