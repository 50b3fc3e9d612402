"""Sharded initializers: the same initializations on a weight spread over ranks as a DTensor.

Each takes a ``torch.distributed.tensor.DTensor`` sharded by rows (``Shard(0)``) or columns
(``Shard(1)``) on a 1-D device mesh and returns a :class:`ShardedLoraInit` whose factors and
residual are DTensors; gathered, they equal the single-process ``loram_ref`` initializer of
the same name on the whole weight, within the tolerance on its :class:`ShardedSpec`, for
any world size. Every byte sent goes through :class:`Collectives` and is counted.

>>> # under torchrun, on each rank:
>>> # from torch.distributed.tensor import distribute_tensor, Shard
>>> # w = distribute_tensor(full_weight, mesh, [Shard(0)])
>>> # init = loram_ref.sharded.SHARDED["loram_dst"].fn(w, rank=16)
"""

from __future__ import annotations

from . import loram, noise, olora, pissa  # noqa: F401  (registration side effect)
from .comm import Collectives, Ledger
from .layout import Layout, layout_of
from .pissa import gather_weight, sharded_randomized_svd
from .qr import cholesky_qr, column_signs
from .registry import SHARDED, ShardedLoraInit, ShardedSpec, get_sharded

__all__ = ["SHARDED", "Collectives", "Layout", "Ledger", "ShardedLoraInit", "ShardedSpec", "cholesky_qr",
           "column_signs", "gather_weight", "get_sharded", "layout_of", "sharded_randomized_svd"]
