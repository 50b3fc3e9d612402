"""Where a rank's shard sits in the global weight, and the DTensors the results are returned as.

DTensor's ``Shard(d)`` splits dimension ``d`` as ``torch.chunk`` does: blocks of
``ceil(size/p)``, the last ones shorter or empty. :class:`Layout` computes the same block
for this rank, so every algorithm works on ``weight.to_local()`` with its global offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard


@dataclass(frozen=True)
class Layout:
    """This rank's block of an ``m x n`` weight sharded along ``dim`` (0: rows, 1: columns) over ``world`` ranks."""

    shape: tuple[int, int]
    dim: int
    world: int
    index: int

    @property
    def size(self) -> int:
        """The global length of the sharded dimension."""
        return self.shape[self.dim]

    @property
    def chunk(self) -> int:
        return -(-self.size // self.world)

    @property
    def start(self) -> int:
        return min(self.index * self.chunk, self.size)

    @property
    def stop(self) -> int:
        return min(self.start + self.chunk, self.size)

    def block(self, full: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """This rank's part of ``full`` along ``dim`` (default: the sharded one), a view."""
        return full.narrow(self.dim if dim is None else dim, self.start, self.stop - self.start)


def layout_of(weight: DTensor) -> Layout:
    """The layout of a DTensor weight on a 1-D mesh with one ``Shard(0)`` or ``Shard(1)`` placement."""
    if not isinstance(weight, DTensor):
        raise TypeError(f"weight must be a DTensor (torch.distributed.tensor), got {type(weight).__name__}; for a "
                        "plain tensor use the loram_ref initializer of the same name")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out x d_in), got shape {tuple(weight.shape)}")
    mesh = weight.device_mesh
    if mesh.ndim != 1 or len(weight.placements) != 1:
        raise ValueError(f"weight must live on a 1-D device mesh, got a {mesh.ndim}-D mesh with placements "
                         f"{weight.placements}; flatten the mesh or shard along one dimension")
    placement = weight.placements[0]
    if not isinstance(placement, Shard) or placement.dim not in (0, 1):
        raise ValueError(f"weight must be sharded by rows (Shard(0)) or columns (Shard(1)), got {placement}; a "
                         "replicated weight needs no sharded init: use the loram_ref initializer on weight.to_local()")
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("this rank is not part of the weight's device mesh")
    return Layout(shape=(int(weight.shape[0]), int(weight.shape[1])), dim=placement.dim, world=mesh.size(),
                  index=coordinate[0])


def sharded(local: torch.Tensor, like: DTensor, dim: int, shape: tuple[int, int]) -> DTensor:
    """``local`` as this rank's ``Shard(dim)`` block of a global ``shape`` tensor on ``like``'s mesh."""
    return DTensor.from_local(local, like.device_mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                              stride=(shape[1], 1))


def replicated(tensor: torch.Tensor, like: DTensor) -> DTensor:
    """``tensor`` (the same on every rank) as a replicated DTensor on ``like``'s mesh."""
    return DTensor.from_local(tensor, like.device_mesh, [Replicate()], run_check=False)


def shape_proxy(weight: DTensor) -> torch.Tensor:
    """A one-element tensor expanded to the weight's global shape, dtype and device: what the
    single-process input checks and the shape-only initializers read, without any memory."""
    local = weight.to_local()
    return torch.zeros((), dtype=local.dtype, device=local.device).expand(*weight.shape)
