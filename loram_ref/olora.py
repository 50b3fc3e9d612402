"""OLoRA: orthonormal LoRA from the QR of W (docs/initializers.md §6; Büyükakyüz 2024, arXiv 2406.01775; PEFT olora_init)."""

from __future__ import annotations

import torch

from .residual import finish, work_copy
from .registry import PASSES, Invariant, register
from .result import LoraInit
from .validation import check_inputs
from .work import Work

_PAPER = "Büyükakyüz 2024, OLoRA (arXiv 2406.01775); PEFT olora_init"
ALGORITHMS = ("columns", "full")


def olora_work(m: int, n: int, r: int, itemsize: int) -> Work:
    """The r-column algorithm: Householder QR of the m x r block (≈ 2·m·r² flops), ``Q_rᵀ·W``
    (2·m·n·r) and the residual GEMM (2·m·n·r); W read twice (the product and the residual)
    and the fp32 residual written once."""
    return Work(read_bytes=2 * m * n * itemsize, rw_bytes=m * n * 4 + m * n * itemsize,
                flops=4.0 * m * n * r + 2.0 * m * r * r)


def full_qr_work(m: int, n: int, r: int, itemsize: int) -> Work:
    """PEFT's algorithm: a reduced Householder QR of W, ≈ 2·m·n·k − (2/3)·k³ flops (k = min(m, n))."""
    k = min(m, n)
    return Work(read_bytes=m * n * itemsize, rw_bytes=2 * m * n * 4, flops=2.0 * m * n * k - (2.0 / 3.0) * k**3,
                gemm="square")


def _factors(work: torch.Tensor, rank: int, algorithm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q_r, R_r)`` of the fp32 ``work`` copy: ``Q_r`` m x r orthonormal, ``R_r = Q_rᵀ·W`` r x n."""
    if algorithm == "full":  # PEFT: torch.linalg.qr of the whole W, then the first r columns / rows
        q, r = torch.linalg.qr(work)
        return q[:, :rank].contiguous(), r[:rank].contiguous()
    # Householder reflection j depends only on column j after reflections 1..j-1, so the QR of
    # the first r columns gives the full QR's Q_r, and R[:r] = Q_rᵀ·W (equal up to rounding).
    q_r = torch.linalg.qr(work[:, :rank]).Q
    return q_r, q_r.mT @ work


@register(
    "olora",
    harness=("inplace", "check_input"),
    work=olora_work,
    invariant=Invariant.FUNCTION_PRESERVING,
    cost=PASSES,
    peft_name='"olora"',
    decomposition="QR of W's first r columns",
    label="OLoRA",
    paper=_PAPER,
    summary="B = Q_r, A = Q_rᵀW from the QR of W's first r columns; W_res = W - s·B·A",
)
def olora(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    algorithm: str = "columns",
    fold_scaling: bool = False,
    inplace: bool = False,
    check_input: bool = True,
) -> LoraInit:
    """OLoRA (PEFT ``init_lora_weights="olora"``), docs/initializers.md §6.

    ``W = Q·R`` (fp32 reduced QR); ``B = Q[:, :r]``, ``A = R[:r, :] = Q_rᵀ·W``;
    ``W_res = W − s·B·A``. Invariant (F). ``B·A = Q_r·Q_rᵀ·W`` projects W onto the span of
    its first r columns.

    ``algorithm="columns"`` (default) computes ``Q_r`` from the Householder QR of the
    m x r block ``W[:, :r]`` and ``A = Q_rᵀ·W``: O(m·n·r) instead of PEFT's O(m·n·min(m, n))
    full QR (``algorithm="full"``), with the same factors up to rounding (tested against PEFT).

    ``fold_scaling=False`` is PEFT's behaviour: the factors do not carry ``1/s``, so the
    adapter's product is ``s·Q_r·R_r`` and the residual ``W − s·Q_r·R_r``; a LoRA scaling
    other than 1 removes more (or less) than W's projection. ``fold_scaling=True`` divides A
    by s so that ``s·B·A = Q_r·Q_rᵀ·W`` whatever s is (the residual is then W's component
    outside the first r columns' span).

    Decisions: as PEFT, the residual is computed in fp32 and cast to W's dtype once; A and B
    are returned in W's dtype (PEFT leaves them fp32 in the layer and casts them when it
    moves the adapter to the base layer's dtype).
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if rank > min(weight.shape):
        raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = {min(weight.shape)}: a QR of W has no more columns")
    work = work_copy(weight, inplace)
    q_r, r_r = _factors(work, rank, algorithm)
    a = r_r.div_(scaling) if fold_scaling else r_r
    work.addmm_(q_r, a, alpha=-scaling)  # W_res = W − s·B·A, in fp32, in place
    residual = finish(work, weight, inplace, "olora")
    return LoraInit(method="olora", A=a.to(weight.dtype), B=q_r.to(weight.dtype), scaling=scaling, residual=residual,
                    info={"algorithm": algorithm, "fold_scaling": fold_scaling})
