"""Noise-zeros and PEFT's orthogonal init on a sharded weight: the factors drawn whole from the
seed on every rank (docs/initializers.md §1, §6).

The single-process initializers never read ``W``, only its shape, so every rank runs them on
a zero-memory stand-in of the global shape (:func:`layout.shape_proxy`): the same
generator, the same draws, the same cast. The factors are then identical on every rank
and bit for bit the single-process ones; a rank keeps its columns of A under ``Shard(1)``
and its rows of B under ``Shard(0)`` (noise-zeros' ``B = 0`` is allocated at this rank's rows
only). No communication. A caller's own ``generator`` must be in the same state on every
rank (seed it the same everywhere).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from ..registry import get_initializer
from .comm import Collectives
from .layout import layout_of, replicated, shape_proxy, sharded
from .registry import ShardedLoraInit, register_sharded


def _noise_sharded(name: str, weight: DTensor, rank: int, scaling: float, generator: torch.Generator | None,
                   seed: int) -> ShardedLoraInit:
    lay = layout_of(weight)
    m, n = lay.shape
    whole = get_initializer(name).fn(shape_proxy(weight), rank, scaling, generator=generator, seed=seed)
    if lay.dim == 1:
        a = sharded(lay.block(whole.A, dim=1).contiguous(), weight, 1, (rank, n))
        b = replicated(whole.B, weight)
    else:
        a = replicated(whole.A, weight)
        b = sharded(torch.zeros(lay.stop - lay.start, rank, dtype=whole.B.dtype, device=whole.B.device), weight, 0,
                    (m, rank))
    return ShardedLoraInit(method=name, A=a, B=b, scaling=whole.scaling, residual=None, info=dict(whole.info))


_EXACT = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 0.0, torch.float16: 0.0}


@register_sharded("orthogonal", communication="none", tolerance=_EXACT,
                  summary="A and B drawn whole from the seed on every rank (PEFT's order), this rank's block kept")
def orthogonal(weight: DTensor, rank: int, scaling: float = 1.0, *, allow_odd_rank: bool = False,
               generator: torch.Generator | None = None, seed: int = 0,
               comm: Collectives | None = None) -> ShardedLoraInit:
    """:func:`loram_ref.orthogonal.orthogonal` on a sharded weight: ``O((m+n)·r)`` random
    numbers per rank (both factors are non-zero, so each is drawn whole and cut)."""
    lay = layout_of(weight)
    m, n = lay.shape
    whole = get_initializer("orthogonal").fn(shape_proxy(weight), rank, scaling, allow_odd_rank=allow_odd_rank,
                                             generator=generator, seed=seed)
    if lay.dim == 1:
        a, b = sharded(lay.block(whole.A, dim=1).contiguous(), weight, 1, (rank, n)), replicated(whole.B, weight)
    else:
        a, b = replicated(whole.A, weight), sharded(lay.block(whole.B, dim=0).contiguous(), weight, 0, (m, rank))
    return ShardedLoraInit(method="orthogonal", A=a, B=b, scaling=whole.scaling, residual=None, info=dict(whole.info))


@register_sharded("noise_zeros", communication="none", tolerance=_EXACT,
                  summary="A = Kaiming-uniform drawn whole from the seed on every rank, B = 0 at this rank's rows")
def noise_zeros(weight: DTensor, rank: int, scaling: float = 1.0, *, generator: torch.Generator | None = None,
                seed: int = 0, comm: Collectives | None = None) -> ShardedLoraInit:
    """:func:`loram_ref.noise.noise_zeros` on a sharded weight; ``O(r·n)`` random numbers per rank."""
    return _noise_sharded("noise_zeros", weight, rank, scaling, generator, seed)


@register_sharded("gaussian", communication="none", tolerance=_EXACT,
                  summary="A ~ N(0, 1/r²) drawn whole from the seed on every rank, B = 0 at this rank's rows")
def gaussian(weight: DTensor, rank: int, scaling: float = 1.0, *, generator: torch.Generator | None = None,
             seed: int = 0, comm: Collectives | None = None) -> ShardedLoraInit:
    """:func:`loram_ref.noise.gaussian` on a sharded weight; ``O(r·n)`` random numbers per rank."""
    return _noise_sharded("gaussian", weight, rank, scaling, generator, seed)
