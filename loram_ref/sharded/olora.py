"""OLoRA on a sharded weight: the QR of W's first r columns, no weight gathered (docs/initializers.md §6).

``B = Q_r`` and ``A = Q_rᵀ·W`` need only the m x r block ``W[:, :r]``:

* rows sharded (``Shard(0)``): each rank holds its rows of that block; ``Q_r`` comes from
  CholeskyQR2 on the all-reduced r x r Gram (:func:`loram_ref.sharded.qr.cholesky_qr`),
  row-sharded like B; ``A = Σ_k Q_kᵀ·W_k`` is one all-reduce of r x n floats;
* columns sharded (``Shard(1)``): the ranks holding the first r columns contribute them to
  one all-reduce of the m x r block; every rank then runs the single-process Householder QR
  on it (so ``Q_r`` is the single-process one bit for bit) and ``A``'s columns are local.

The residual ``W − s·B·A`` is this rank's block. CholeskyQR and Householder QR give the
same ``Q_r`` up to the sign of each column (Householder's R has diagonal signs of its own,
CholeskyQR's is positive), which ``B·A`` does not see: the spec is sign-free.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from ..olora import _factors
from ..residual import finish, work_copy
from ..validation import check_inputs
from .comm import Collectives
from .layout import layout_of, replicated, shape_proxy, sharded
from .pissa import _check_finite
from .qr import cholesky_qr
from .registry import ShardedLoraInit, register_sharded


@register_sharded(
    "olora",
    communication="Shard(0): two all-reduces of r x r float64 (CholeskyQR2) and one of r x n; Shard(1): one all-reduce "
                  "of the m x r column block",
    tolerance={torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2},
    sign_free=True,
    summary="QR of the first r columns: CholeskyQR2 over row shards (A all-reduced), or the m x r block all-reduced "
            "and QR'd on every rank under column shards",
)
def olora(weight: DTensor, rank: int, scaling: float = 1.0, *, fold_scaling: bool = False, inplace: bool = False,
          check_input: bool = True, comm: Collectives | None = None) -> ShardedLoraInit:
    """:func:`loram_ref.olora.olora` (``algorithm="columns"``) on a sharded weight. Per rank: one
    fp32 copy of its shard (the residual), the m x r block under ``Shard(1)``, ``O((m+n)·r)`` more."""
    lay = layout_of(weight)
    scaling = check_inputs(shape_proxy(weight), rank, scaling, check_input=False)
    m, n = lay.shape
    if rank > min(m, n):
        raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = {min(m, n)}: a QR of W has no more columns")
    comm = comm or Collectives(weight.device_mesh.get_group())
    local = weight.to_local()
    if check_input:
        _check_finite(local, comm)
    work = work_copy(local, inplace)
    if lay.dim == 0:
        q_r = cholesky_qr(work[:, :rank].contiguous(), comm, m)[0]
        a = comm.all_reduce(q_r.mT @ work)
    else:
        block = torch.zeros(m, rank, dtype=work.dtype, device=work.device)
        lo, hi = lay.start, min(lay.stop, rank)
        if hi > lo:
            block[:, lo:hi] = work[:, : hi - lo]
        q_r = _factors(comm.all_reduce(block), rank, "columns")[0]
        a = q_r.mT @ work
    if fold_scaling:
        a = a.div_(scaling)
    work.addmm_(q_r, a, alpha=-scaling)  # this rank's block of W − s·B·A, in fp32
    residual = finish(work, local, inplace, "olora")
    a, b = a.to(local.dtype), q_r.to(local.dtype)
    return ShardedLoraInit(
        method="olora",
        A=sharded(a.contiguous(), weight, 1, (rank, n)) if lay.dim == 1 else replicated(a, weight),
        B=sharded(b.contiguous(), weight, 0, (m, rank)) if lay.dim == 0 else replicated(b, weight),
        scaling=scaling, residual=sharded(residual, weight, lay.dim, (m, n)),
        info={"algorithm": "columns, distributed", "fold_scaling": fold_scaling, "world_size": lay.world})
