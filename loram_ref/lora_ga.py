"""LoRA-GA: low-rank adaptation with gradient approximation (docs/initializers.md §6; Wang et al. 2024, arXiv 2407.05000; PEFT lora_ga_init)."""

from __future__ import annotations

import torch

from .fidelity import angle_deg, orthonormal_rows
from .linalg import randomized_svd
from .residual import finish, work_copy
from .registry import Invariant, Statistics, register
from .result import LoraInit
from .statistics.types import GradientStats
from .validation import check_inputs, resolve_generator
from .work import Work

DIRECTIONS = ("ArB2r", "ArBr", "A2rBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
VARIANTS = ("peft", "original")
NITER = 4  # PEFT's and the paper code's svd_lowrank(niter=4)


def lora_ga_work(m: int, n: int, r: int, itemsize: int) -> Work:
    """A randomized SVD of the fp32 gradient with q = 4r and 4 iterations (10 passes of a
    rank-4r GEMM), then the residual GEMM on W (rank r)."""
    q = min(4 * r, m, n)
    return Work(read_bytes=10 * m * n * 4 + m * n * itemsize, rw_bytes=2 * m * n * itemsize,
                flops=10 * 2.0 * m * n * q + 2.0 * m * n * r)


#: the exact triplets each direction takes for A (rows of Vᵀ) and B (columns of U), 0-based
_INDICES = {"ArB2r": (lambda r: range(r), lambda r: range(r, 2 * r)),
            "A2rBr": (lambda r: range(r, 2 * r), lambda r: range(r)),
            "ArBr": (lambda r: range(1, 2 * r, 2), lambda r: range(0, 2 * r, 2))}


def lora_ga_fidelity(weight: torch.Tensor, rank: int, init: LoraInit, kwargs: dict) -> dict[str, float]:
    """The largest principal angle (°) between A's row space and B's column space and the
    exact singular subspaces of G they stand for (a full SVD of the gradient; ``random``
    draws its indices, so it has none)."""
    direction = kwargs.get("direction", "ArB2r")
    if direction not in _INDICES:
        return {}
    u, _, vh = torch.linalg.svd(kwargs["stats"].grad.double(), full_matrices=False)
    rows_a, cols_b = (list(f(rank)) for f in _INDICES[direction])
    return {"angle_deg_A": angle_deg(orthonormal_rows(init.A), vh[rows_a].mT),
            "angle_deg_B": angle_deg(torch.linalg.qr(init.B.double()).Q, u[:, cols_b])}


def _pick(u, s, vh, rank: int, direction: str, gen: torch.Generator):
    """``(A rows, B columns, S_B)`` of the 2r leading triplets per ``direction`` (PEFT's indices)."""
    if direction == "ArB2r":  # A: rows 0..r−1, B: columns r..2r−1
        return vh[:rank], u[:, rank:2 * rank], s[rank:2 * rank]
    if direction == "A2rBr":  # A: rows r..2r−1, B: columns 0..r−1
        return vh[rank:2 * rank], u[:, :rank], s[:rank]
    if direction == "ArBr":  # A: odd rows, B: even columns
        return vh[1:2 * rank:2], u[:, 0:2 * rank:2], s[0:2 * rank:2]
    idx = torch.randperm(2 * rank, generator=gen, device=gen.device)[:rank]  # "random"
    return vh[idx], u[:, idx], s[idx]


def two_r_fits(m: int, n: int, rank: int) -> str | None:
    if 2 * rank > min(m, n):
        return (f"lora_ga splits the gradient's 2r leading triplets between A and B: rank {rank} needs "
                f"min(d_out, d_in) >= {2 * rank}, got {min(m, n)}")
    return None


@register(
    "lora_ga",
    rank_rule=two_r_fits,
    harness=("generator", "inplace", "check_input"),
    work=lora_ga_work,
    fidelity=lora_ga_fidelity,
    invariant=Invariant.FUNCTION_PRESERVING,
    statistics=Statistics.GRADIENT,
    peft_name='"lora_ga"',
    decomposition="randomized SVD of the mean gradient (q = 4r, 4 iterations)",
    label="LoRA-GA",
    paper="Wang, Yu & Li 2024, LoRA-GA (arXiv 2407.05000); PEFT lora_ga_init",
    summary="A = V[:r]ᵀ, B = U[:, r:2r]·S·d_out^¼/√γ of the mean gradient's rSVD; W_res = W - s·B·A",
)
def lora_ga(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    stats: GradientStats | None = None,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16.0,
    variant: str = "peft",
    generator: torch.Generator | None = None,
    seed: int = 0,
    inplace: bool = False,
    check_input: bool = True,
) -> LoraInit:
    """LoRA-GA (PEFT ``init_lora_weights="lora_ga"``), docs/initializers.md §6.

    ``U, S, V = rsvd(G, q = min(4r, m, n), niter = 4)`` of the mean gradient; the 2r leading
    triplets are split between A and B by ``direction`` (default ``ArB2r``: ``A = V[:, :r]ᵀ``,
    ``B = U[:, r:2r]``); then ``W_res = W − s·B·A`` (invariant F).

    ``variant="peft"`` (default, PEFT 0.21): ``B ← B·diag(S_B)``, and ``scale`` acts on the
    factors: ``"stable"`` multiplies B by ``d_out^¼/√γ``; ``"weight_svd"`` multiplies B by
    ``σ₁(W)/S_B[0]`` (σ₁ from a second rSVD with q = r); ``"gd_scale"`` divides both by s;
    ``"unit"`` leaves them. ``variant="original"`` is the paper code's: B carries no singular
    values, and ``"stable"`` multiplies both A and B by ``d_out^¼/√γ``.

    A generator in the global RNG's state reproduces PEFT's draws in their order (the
    gradient's rSVD, ``randperm`` for ``"random"``, then the weight's rSVD). A and B are cast
    to W's dtype before the residual is computed from them in fp32, as PEFT does, so the
    rounding of the factors does not break the invariant. ``inplace`` lets the residual
    overwrite ``weight``'s storage.
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    if not isinstance(stats, GradientStats):
        raise TypeError(f"stats must be a GradientStats (the mean gradient), got {type(stats).__name__}")
    stats.validate(tuple(weight.shape))
    for value, allowed, label in ((direction, DIRECTIONS, "direction"), (scale, SCALES, "scale"),
                                  (variant, VARIANTS, "variant")):
        if value not in allowed:
            raise ValueError(f"{label} must be one of {', '.join(allowed)}, got {value!r}")
    if not stable_gamma > 0:
        raise ValueError(f"stable_gamma must be > 0, got {stable_gamma}")
    m, n = weight.shape
    problem = two_r_fits(m, n, rank)
    if problem:
        raise ValueError(problem)
    gen = resolve_generator(generator, weight.device, seed)
    grad = stats.grad.to(device=weight.device, dtype=torch.float32)
    u, s, v = randomized_svd(grad, min(4 * rank, m, n), NITER, gen)
    u, s, vh = u[:, :2 * rank], s[:2 * rank], v.mT[:2 * rank]
    a, b, s_b = _pick(u, s, vh, rank, direction, gen)
    stable = m**0.25 / stable_gamma**0.5
    info: dict = {"direction": direction, "scale": scale, "variant": variant, "stable_gamma": float(stable_gamma),
                  "grad_sigma_1": float(s[0])}
    if variant == "original":
        if scale == "stable":
            a, b = a * stable, b * stable
        elif scale == "gd_scale":
            a, b = a / scaling, b / scaling
        elif scale == "weight_svd":
            raise ValueError("variant='original' has no 'weight_svd' scale; use variant='peft'")
    else:
        b = b @ torch.diag(s_b)
        if scale == "stable":
            b = b * stable
        elif scale == "weight_svd":
            w_s = randomized_svd(weight.to(torch.float32), rank, NITER, gen)[1]
            if float(s_b[0]) > 0:
                factor = w_s[0] / s_b[0]
                b = b * factor
                info["weight_svd_factor"] = float(factor)
        elif scale == "gd_scale":
            a, b = a / scaling, b / scaling
    a, b = a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()
    work = work_copy(weight, inplace)  # one fp32 copy of W, turned into the residual in place
    work.addmm_(b.to(work.dtype), a.to(work.dtype), alpha=-scaling)
    residual = finish(work, weight, inplace, "lora_ga")
    return LoraInit(method="lora_ga", A=a, B=b, scaling=scaling, residual=residual, info=info)
