"""LoRA-One: the one-step full gradient's spectral init, W unchanged (docs/initializers.md §6; Zhang, Liu & Chen, ICML 2025, arXiv 2502.01235)."""

from __future__ import annotations

import torch

from .fidelity import angle_deg, orthonormal_rows
from .linalg import randomized_svd
from .registry import Invariant, PublishedScaling, Statistics, register
from .result import LoraInit
from .statistics.types import GradientStats
from .validation import check_inputs, check_positive_int, resolve_generator
from .work import Work

SCALES = ("stable", "unit")


def lora_one_work(q: int, niter: int):
    """A randomized SVD of the fp32 gradient with ``q`` columns and ``niter`` iterations:
    2·niter + 2 passes of a rank-q GEMM. W is not read."""

    def model(m: int, n: int, r: int, itemsize: int) -> Work:
        k = min(q, m, n)
        passes = 2 * niter + 2
        return Work(read_bytes=passes * m * n * 4, flops=passes * 2.0 * m * n * k)

    return model


def lora_one_fidelity(weight: torch.Tensor, rank: int, init: LoraInit, kwargs: dict) -> dict[str, float]:
    """The largest principal angle (°) between col(B), row(A) and the exact top-r singular
    subspaces of −G (a full SVD), and the share of ‖[−G]_r‖ the product captures."""
    u, s, vh = torch.linalg.svd(kwargs["stats"].grad.double().neg(), full_matrices=False)
    exact = (u[:, :rank] * s[:rank]) @ vh[:rank]
    product = init.product(torch.float64)
    scale = float((product * exact).sum() / exact.square().sum()) if float(exact.square().sum()) > 0 else 0.0
    return {"angle_deg_A": angle_deg(orthonormal_rows(init.A), vh[:rank].mT),
            "angle_deg_B": angle_deg(torch.linalg.qr(init.B.double()).Q, u[:, :rank]),
            "product_rel_err": float((product - scale * exact).norm() / (scale * exact).norm()) if scale else 1.0}


@register(
    "lora_one",
    fidelity=lora_one_fidelity,
    harness=("generator", "check_input"),
    work=lora_one_work(512, 16),
    invariant=Invariant.SHIFTED,
    statistics=Statistics.GRADIENT,
    decomposition="randomized SVD of −G (q = 512, 16 iterations)",
    published=PublishedScaling(alpha=16.0, rslora=True,
                               source="the official command uses rsLoRA with lora_alpha = 16 (docs/initializers.md §6)"),
    label="LoRA-One",
    paper="Zhang, Liu & Chen 2025, LoRA-One (ICML 2025, arXiv 2502.01235); YuanheZ/LoRA-One",
    summary="B = U_r√S_r, A = √S_r V_rᵀ of −G over √S₁, times d_out^¼/√γ; W unchanged",
)
def lora_one(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    stats: GradientStats | None = None,
    stable_gamma: float = 64.0,
    scale: str = "stable",
    q: int = 512,
    niter: int = 16,
    generator: torch.Generator | None = None,
    seed: int = 0,
    check_input: bool = True,
) -> LoraInit:
    """LoRA-One, docs/initializers.md §6 (the official code's ``direction="LoRA-One"``).

    ``U, S, V = rsvd(−G, q, niter)`` of the negated mean gradient (q = 512, 16 iterations
    in the official code; q is capped at min(m, n));
    ``B = U_r·diag(√S_r)/√S₁`` and ``A = diag(√S_r)·V_rᵀ/√S₁``, so ``B·A = U_r·S_r·V_rᵀ/S₁``,
    the best rank-r approximation of one gradient-descent step normalized to spectral norm
    1. ``scale="stable"`` (the official command's) multiplies both by ``d_out^¼/√γ``
    (γ = 64 there). W is not modified: invariant (S), the model at step 0 is
    ``W + s·B·A``, a normalized one-step update (s = α/√r with rsLoRA, its published
    scaling).
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    if not isinstance(stats, GradientStats):
        raise TypeError(f"stats must be a GradientStats (the mean gradient), got {type(stats).__name__}")
    stats.validate(tuple(weight.shape))
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if not stable_gamma > 0:
        raise ValueError(f"stable_gamma must be > 0, got {stable_gamma}")
    q = check_positive_int(q, "q")
    niter = check_positive_int(niter, "niter", minimum=0)
    m, n = weight.shape
    k = min(q, m, n)
    if rank > k:
        raise ValueError(f"rank {rank} exceeds the randomized SVD's {k} columns (q = {q}, min(d_out, d_in) = "
                         f"{min(m, n)})")
    gen = resolve_generator(generator, weight.device, seed)
    grad = stats.grad.to(device=weight.device, dtype=torch.float32)
    u, s, v = randomized_svd(grad.neg(), k, niter, gen)
    if not float(s[0]) > 0:
        raise ValueError("lora_one: the mean gradient is zero (its top singular value is 0); collect statistics "
                         "on data the model has a loss on")
    root = s[:rank].sqrt() / s[0].sqrt()
    factor = m**0.25 / stable_gamma**0.5 if scale == "stable" else 1.0
    b = u[:, :rank] * (root * factor)[None, :]
    a = v[:, :rank].mT * (root * factor)[:, None]
    return LoraInit(method="lora_one", A=a.to(weight.dtype).contiguous(), B=b.to(weight.dtype).contiguous(),
                    scaling=scaling, info={"grad_sigma_1": float(s[0]), "q": k, "niter": niter, "scale": scale,
                                           "stable_gamma": float(stable_gamma)})
