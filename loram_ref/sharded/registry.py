"""Name → sharded initializer, with every fact the benchmark and the tests need on its spec."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor

from ..result import LoraInit


@dataclass
class ShardedLoraInit:
    """A sharded initializer's result: the factors and the residual as DTensors.

    A factor whose rows (``B``) or columns (``A``) follow the weight's sharded dimension is
    ``Shard`` like it; the other factor is ``Replicate`` (identical on every rank). The
    residual is sharded like the weight; ``None`` when the method leaves ``W`` unchanged.
    """

    method: str
    A: DTensor
    B: DTensor
    scaling: float
    residual: DTensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def full(self) -> LoraInit:
        """Every rank gets the whole result as a :class:`loram_ref.LoraInit` (a collective: all ranks call it)."""
        return LoraInit(method=self.method, A=self.A.full_tensor(), B=self.B.full_tensor(), scaling=self.scaling,
                        residual=None if self.residual is None else self.residual.full_tensor(), info=dict(self.info))


@dataclass(frozen=True)
class ShardedSpec:
    """One sharded initializer.

    Attributes:
        name: the name, the same as the ``loram_ref`` initializer it reproduces.
        fn: ``fn(weight: DTensor, rank, scaling=1.0, *, comm=None, ...) -> ShardedLoraInit``.
        communication: what crosses the ranks per call, in words.
        tolerance: the largest ``max|got − ref| / max|ref|`` of any of ``A``, ``B``, the
            residual against the single-process result on the same weight, per dtype; 0 means
            bit for bit. Stated for the weights the tests use; the comment at each
            registration says why.
        sign_free: the reference leaves each triplet's sign to its SVD routine; compare after
            aligning each column of ``B`` (and row of ``A``) with the reference's.
        gathers_weight: the baseline that gathers the whole weight on every rank.
    """

    name: str
    fn: Callable[..., ShardedLoraInit]
    communication: str
    tolerance: dict[torch.dtype, float]
    summary: str
    sign_free: bool = False
    gathers_weight: bool = False


SHARDED: dict[str, ShardedSpec] = {}


def _guard(fn: Callable[..., ShardedLoraInit]) -> Callable[..., ShardedLoraInit]:
    """The registered form (as ``loram_ref.guard`` for one process): no autograd graph, and
    this rank's blocks of the factors checked finite; a non-finite block raises on the rank
    that holds it (under torchrun the launch then ends every rank)."""

    @functools.wraps(fn)
    def guarded(weight, rank, scaling=1.0, *args, **kwargs) -> ShardedLoraInit:
        with torch.no_grad():
            out = fn(weight, rank, scaling, *args, **kwargs)
        for label, tensor in (("A", out.A), ("B", out.B)):
            if not bool(torch.isfinite(tensor.to_local()).all()):
                raise ValueError(f"{out.method} produced non-finite {label} on this rank's block; check the weight "
                                 "for extreme values (float16 overflows above 65504)")
        return out

    return guarded


def register_sharded(name: str, *, communication: str, tolerance: dict[torch.dtype, float], summary: str,
                     sign_free: bool = False, gathers_weight: bool = False):
    """Add the decorated function to :data:`SHARDED` under ``name``."""

    def decorate(fn: Callable[..., ShardedLoraInit]) -> Callable[..., ShardedLoraInit]:
        if name in SHARDED:
            raise ValueError(f"sharded initializer {name!r} is registered twice")
        guarded = _guard(fn)
        SHARDED[name] = ShardedSpec(name=name, fn=guarded, communication=communication, tolerance=dict(tolerance),
                                    summary=summary, sign_free=sign_free, gathers_weight=gathers_weight)
        return guarded

    return decorate


def get_sharded(name: str) -> ShardedSpec:
    """Look up a sharded initializer; unknown names list the known ones."""
    if name not in SHARDED:
        raise ValueError(f"no sharded version of initializer {name!r}; sharded initializers: {', '.join(sorted(SHARDED))}")
    return SHARDED[name]
