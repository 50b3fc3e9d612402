"""Orthonormal r-column bases used by LoRAM (docs/initializers.md §5)."""

from __future__ import annotations

import functools
import math

import torch


def dst_basis(dim: int, rank: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """First ``rank`` columns of the orthonormal DST-I of size ``dim`` (a fresh tensor; see :func:`_dst_basis`)."""
    return _dst_basis(dim, rank, dtype, str(torch.device(device))).clone()


@functools.lru_cache(maxsize=64)
def _dst_basis(dim: int, rank: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """First ``rank`` columns of the orthonormal DST-I matrix of size ``dim`` (docs/initializers.md §5).

    ``S_d[i, j] = √(2/(d+1)) · sin(π(i+1)(j+1)/(d+1))`` for ``0 <= i < d``, ``0 <= j < r``:
    the ``r`` lowest-frequency sines, exactly orthonormal columns. Closed form, no
    transform: O(d·r) sines and O(d·r) memory.

    The phase ``(i+1)(j+1)`` is reduced modulo ``2(d+1)`` in int64 before it is scaled by
    ``π/(d+1)``, so the sine argument stays in ``[0, 2π)`` and is evaluated in float64
    without the precision loss a large argument would cause at d = 28672.

    Cached per (dim, rank, dtype, device): a model repeats a few shapes over all its
    layers (80 at 70B), and the sines are the same each time (O(d·r) memory per entry).
    """
    return dst_rows(dim, rank, 0, dim, dtype=dtype, device=device)


def dst_rows(dim: int, rank: int, start: int, stop: int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows ``start:stop`` of :func:`dst_basis` ``(dim, rank)``, computed from their global indices.

    The same closed form entry by entry, so a rank that holds rows ``start:stop`` of a
    sharded weight gets the rows the whole basis has there (up to the last bit of a
    vectorized sine), without computing the others (``loram_ref.sharded``).
    """
    i = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=device)
    j = torch.arange(1, rank + 1, dtype=torch.int64, device=device)
    phase = torch.outer(i, j).remainder_(2 * (dim + 1))
    basis = torch.sin(phase.to(torch.float64).mul_(math.pi / (dim + 1))).mul_(math.sqrt(2.0 / (dim + 1)))
    return basis.to(dtype)


def random_orthogonal_basis(
    dim: int,
    rank: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A Haar-distributed ``dim x rank`` matrix with orthonormal columns.

    The Q factor of a Gaussian matrix with each column's sign fixed so that ``diag(R) > 0``
    (Mezzadri 2007), which makes the distribution exactly Haar. This is the LoRAM paper's
    "random orthogonal" basis ablation as the spec resolves it (§5).
    """
    gauss = torch.randn(dim, rank, dtype=torch.float32, device=device, generator=generator)
    q, r = torch.linalg.qr(gauss)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q.mul_(signs).to(dtype)
