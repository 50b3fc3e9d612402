"""PEFT's orthogonal init: a zero product from orthogonal halves of a random r x r basis (docs/initializers.md §6; PEFT orthogonal_init)."""

from __future__ import annotations

import torch

from .registry import Invariant, register
from .result import LoraInit
from .validation import check_inputs, resolve_generator
from .work import Work


def orthogonal_work(m: int, n: int, r: int, itemsize: int) -> Work:
    """Two Gaussian blocks (n x r/2, r/2 x m) times r/2 x r halves of Q: 2·(m+n)·r·r/2 flops;
    the factors written. W is never read."""
    return Work(rw_bytes=(m + n) * r * itemsize, flops=(m + n) * r * r)


def orthogonal_parts(rank: int, m: int, n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in fp32, drawn in PEFT's order: ``X`` (r x r), ``G₁`` (n x ⌈r/2⌉), ``G₂`` (⌊r/2⌋ x m)."""
    x = torch.randn(rank, rank, generator=generator, device=device)
    q = torch.linalg.qr(x).Q
    q_odd, q_even = q[0::2, :], q[1::2, :]  # rows 0, 2, … and 1, 3, …: q_even·q_oddᵀ = 0
    a = torch.randn(n, q_odd.shape[0], generator=generator, device=device).mm(q_odd).T / 10.0
    b = torch.randn(q_even.shape[0], m, generator=generator, device=device).T.mm(q_even) / 10.0
    return a, b


def even_rank(m: int, n: int, rank: int) -> str | None:
    return f"PEFT's orthogonal init needs an even rank, got {rank}" if rank % 2 else None


@register(
    "orthogonal",
    rank_rule=even_rank,
    harness=("generator", "check_input"),
    work=orthogonal_work,
    invariant=Invariant.ZERO_PRODUCT,
    reads_weight=False,
    peft_name='"orthogonal"',
    decomposition="QR of an r x r Gaussian",
    label="orthogonal",
    paper="PEFT orthogonal_init (Datta 2024, 'Rethinking LoRA initialisation')",
    summary="A = (G₁·Q[0::2])ᵀ/10, B = G₂ᵀ·Q[1::2]/10 with Q a random orthogonal r x r; B·A = 0",
)
def orthogonal(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    allow_odd_rank: bool = False,
    generator: torch.Generator | None = None,
    seed: int = 0,
    check_input: bool = False,
) -> LoraInit:
    """PEFT's ``init_lora_weights="orthogonal"``, docs/initializers.md §6.

    ``Q = qr(X).Q`` for a Gaussian r x r ``X``; ``q₁ = Q[0::2]``, ``q₂ = Q[1::2]``;
    ``A = (G₁·q₁)ᵀ/10`` and ``B = G₂ᵀ·q₂/10`` with Gaussian ``G₁`` (n x r/2) and ``G₂``
    (r/2 x m). ``B·A = G₂ᵀ·q₂·q₁ᵀ·G₁ᵀ/100 = 0`` because the rows of Q are orthonormal:
    invariant (Z), exact in exact arithmetic; in fp32 it is ~1e-8 relative, and after the
    cast to W's dtype the rounding of A and B leaves ~1e-3 relative in bf16.

    A generator in the state of the global CPU RNG reproduces PEFT bit for bit (the draws
    come in its order, in fp32). PEFT refuses an odd rank (``allow_odd_rank=False``, the
    default, raises the same way); ``allow_odd_rank=True`` splits Q's rows ⌈r/2⌉ / ⌊r/2⌋,
    which keeps ``B·A = 0`` (A then has rank ⌈r/2⌉ and B rank ⌊r/2⌋, so B = 0 at r = 1; at
    an even rank each has rank r/2).
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    if rank % 2 and not allow_odd_rank:
        raise ValueError(f"{even_rank(*weight.shape, rank)}; pass allow_odd_rank=True to split the basis's rows "
                         "unevenly")
    gen = resolve_generator(generator, weight.device, seed)
    m, n = weight.shape
    a, b = orthogonal_parts(rank, m, n, gen, weight.device)
    return LoraInit(method="orthogonal", A=a.contiguous().to(weight.dtype), B=b.contiguous().to(weight.dtype),
                    scaling=scaling, info={"odd_rank_split": bool(rank % 2)})
