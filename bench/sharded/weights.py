"""The weight every rank builds its own shard of, the same for any world size and placement.

``W = U·diag(σ)·Vᵀ + E``: a Gaussian bulk ``E`` of ``nn.Linear`` scale (``N(0, 1/d_in)``,
whose singular values end at ``edge = (√m + √n)/√n``) under ``k = 2r`` spikes
``σ_j = 10·edge·0.87^j`` (``U``, ``V`` with ``N(0, 1/d)`` entries: nearly orthonormal
columns). The top r+1 singular values stand above the bulk, 13 % apart, so the top-r
triplets are well determined and a sharded SVD can be compared with one process's entry
by entry (on a flat spectrum, any two SVDs' vectors differ by far more than rounding).

Rows are generated in blocks of :data:`BLOCK_ROWS`, each from a generator seeded by
``(seed, block)``, so a rank makes only the blocks that cover its rows (all of them, for a
column shard, keeping its columns): memory is one block plus the shard, never ``W``.
"""

from __future__ import annotations

import torch

BLOCK_ROWS = 256


def _spikes(n: int, k: int, seed: int, edge: float, device: torch.device) -> torch.Tensor:
    """``diag(σ)·Vᵀ`` (``k x n``, float64), the same on every rank."""
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + 999_983)
    v = torch.randn(k, n, generator=gen, dtype=torch.float64).mul_(n**-0.5)
    sigma = 10.0 * edge * 0.87 ** torch.arange(k, dtype=torch.float64)
    return (v * sigma[:, None]).to(device)


def weight_block(d_out: int, d_in: int, rank: int, seed: int, rows: tuple[int, int], cols: tuple[int, int],
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``W[rows[0]:rows[1], cols[0]:cols[1]]`` of the benchmark's weight (see the module docstring)."""
    device = torch.device(device)
    k = min(2 * rank, d_out, d_in)
    edge = (d_out**0.5 + d_in**0.5) / d_in**0.5
    spikes = _spikes(d_in, k, seed, edge, device)[:, cols[0]:cols[1]]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    spikes = spikes.to(work)
    out = torch.empty(rows[1] - rows[0], cols[1] - cols[0], dtype=dtype, device=device)
    for block in range(rows[0] // BLOCK_ROWS, -(-rows[1] // BLOCK_ROWS)):
        lo, hi = block * BLOCK_ROWS, min(d_out, (block + 1) * BLOCK_ROWS)
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + block)
        u = torch.randn(hi - lo, k, generator=gen, dtype=torch.float64).mul_(d_out**-0.5).to(device=device, dtype=work)
        bulk = torch.randn(hi - lo, d_in, generator=gen, dtype=torch.float32).mul_(d_in**-0.5)
        part = bulk[:, cols[0]:cols[1]].to(device=device, dtype=work).addmm_(u, spikes)
        a, b = max(lo, rows[0]), min(hi, rows[1])
        out[a - rows[0]:b - rows[0]].copy_(part[a - lo:b - lo])
    return out


def full_weight(d_out: int, d_in: int, rank: int, seed: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The whole weight (what one process initializes in the comparison)."""
    return weight_block(d_out, d_in, rank, seed, (0, d_out), (0, d_in), dtype, device)
