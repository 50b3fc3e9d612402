"""LoRAM on a sharded weight: one all-reduced scalar, no randomness crosses ranks (docs/initializers.md §5).

``‖W‖_F²`` is the sum of the shards' squared norms (one all-reduced float64); ``β`` and
``Q`` follow on every rank (paper Eq. 11-12). The basis rows a rank needs are computed
from their global indices: DST-I rows by the closed form (:func:`loram_ref.bases.dst_rows`),
the random-orthogonal ablation's by drawing the whole ``d x r`` Gaussians from the seed on
every rank, in the single-process order (input side first), and keeping this rank's rows.
The result is the single-process one whatever the sharding, up to the rounding of
``‖W‖²``'s partial sums.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributed.tensor import DTensor

from ..bases import dst_rows, random_orthogonal_basis
from ..loram import NORM_BLOCK_ELEMENTS, ZERO_WEIGHT, _basis_dtype, loram_factors, subtract_update
from ..validation import check_inputs, resolve_generator, squared_norm
from .comm import Collectives
from .layout import Layout, layout_of, replicated, shape_proxy, sharded
from .registry import ShardedLoraInit, register_sharded

#: Basis rows ``(d, start, stop) -> (stop − start) x r`` for one side of the weight.
Rows = Callable[[int, int, int], torch.Tensor]


def global_squared_norm(local: torch.Tensor, comm: Collectives, block_elements: int) -> float:
    """``‖W‖_F²`` of the whole sharded weight: the local float64 sum, all-reduced (8 bytes).

    A NaN/Inf on any rank makes the sum non-finite on every rank, so all ranks raise
    together (a rank raising alone would leave the others waiting in the next collective).
    """
    try:
        local_sq = squared_norm(local, block_elements=block_elements) if local.numel() else 0.0
    except ValueError:
        local_sq = float("nan")
    total = comm.all_reduce(torch.tensor([local_sq], dtype=torch.float64, device=local.device))
    value = float(total[0])
    if not value == value or value in (float("inf"), float("-inf")):
        raise ValueError("weight contains NaN or Inf values (the all-reduced squared Frobenius norm is not finite)")
    return value


def _loram_sharded(name: str, weight: DTensor, rank: int, scaling: float, inplace: bool, comm: Collectives | None,
                   rows: Rows, info: dict) -> ShardedLoraInit:
    lay: Layout = layout_of(weight)
    scaling = check_inputs(shape_proxy(weight), rank, scaling, check_input=False, min_rank=2)
    comm = comm or Collectives(weight.device_mesh.get_group())
    local = weight.to_local()
    m, n = lay.shape
    sq_norm = global_squared_norm(local, comm, max(rank * (m + n), NORM_BLOCK_ELEMENTS))
    if sq_norm == 0.0:
        raise ValueError(ZERO_WEIGHT)
    # the input side's rows follow the columns, the output side's the rows; input side first (the draw order)
    phi_in = rows(n, lay.start, lay.stop) if lay.dim == 1 else rows(n, 0, n)
    phi_out = rows(m, lay.start, lay.stop) if lay.dim == 0 else rows(m, 0, m)
    a, b, gain, beta = loram_factors(sq_norm, (m, n), rank, phi_in, phi_out, local.dtype)
    residual = local if inplace else local.clone()
    subtract_update(residual, a, b, scaling, sq_norm, name)  # this rank's block of W - s·B·A
    return ShardedLoraInit(
        method=name,
        A=sharded(a, weight, 1, (rank, n)) if lay.dim == 1 else replicated(a, weight),
        B=sharded(b, weight, 0, (m, rank)) if lay.dim == 0 else replicated(b, weight),
        scaling=scaling,
        residual=sharded(residual, weight, lay.dim, (m, n)),
        info={**info, "gain_Q": gain, "beta": beta},
    )


@register_sharded(
    "loram_dst",
    communication="one all-reduced float64 (‖W‖²)",
    # the shards' squared norms add up in another order than one process's blocks: β moves by
    # ~1e-8 relative in fp32 (~1e-16 in fp64), the factors and residual by an ulp or two
    tolerance={torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-2},
    summary="‖W‖² all-reduced; DST-I rows from their global indices; the residual updated in place per shard",
)
def loram_dst(weight: DTensor, rank: int, scaling: float = 1.0, *, inplace: bool = False,
              comm: Collectives | None = None) -> ShardedLoraInit:
    """:func:`loram_ref.loram.loram_dst` on a sharded weight (paper Algorithm 1; docs/initializers.md §5).

    Per rank: one read of its shard for ``‖W‖²`` and one read-write for its block of the
    residual; ``O((m/p + n)·r)`` extra memory under ``Shard(0)`` (``O((m + n/p)·r)`` under
    ``Shard(1)``); 8 bytes all-reduced.
    """
    dtype = _basis_dtype(weight.to_local())
    device = weight.to_local().device

    def rows(d: int, start: int, stop: int) -> torch.Tensor:
        return dst_rows(d, rank, start, stop, dtype=dtype, device=device)

    return _loram_sharded("loram_dst", weight, rank, scaling, inplace, comm, rows, {"basis": "dst-I"})


@register_sharded(
    "loram_rorth",
    communication="one all-reduced float64 (‖W‖²)",
    tolerance={torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-2},
    summary="as loram_dst; each rank draws both Haar bases from the seed (input side first) and keeps its rows",
)
def loram_rorth(weight: DTensor, rank: int, scaling: float = 1.0, *, generator: torch.Generator | None = None,
                seed: int = 0, inplace: bool = False, comm: Collectives | None = None) -> ShardedLoraInit:
    """:func:`loram_ref.loram.loram_rorth` on a sharded weight (paper §4.3; docs/initializers.md §5 "Variants").

    The basis is identical on every rank because every rank draws it itself: a generator
    seeded with ``seed`` (or the caller's, which must be in the same state on every rank)
    draws the ``d_in x r`` Gaussian, then the ``d_out x r`` one, exactly as one process
    does, and each is orthonormalized by the same QR on the same input. That is
    ``O((m + n)·r)`` random numbers per rank and no communication; the rows a rank does
    not hold are dropped.
    """
    local = weight.to_local()
    gen = resolve_generator(generator, local.device, seed)
    dtype = _basis_dtype(local)

    def rows(d: int, start: int, stop: int) -> torch.Tensor:
        # the whole d x r basis, drawn in the single-process order (_loram_sharded asks for the input side first)
        return random_orthogonal_basis(d, rank, gen, dtype=dtype, device=local.device)[start:stop].contiguous()

    return _loram_sharded("loram_rorth", weight, rank, scaling, inplace, comm, rows, {"basis": "random-orthogonal"})
