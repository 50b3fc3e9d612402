"""Run by ``torchrun`` from ``tests/test_sharded.py`` (not a test module itself).

On every rank: each sharded initializer on each weight of :data:`CASES`, both placements,
distributed by DTensor's own ``distribute_tensor`` (so the algorithms' offsets are checked
against DTensor's chunking). Checks made here, where the ranks are: the result's
placements; replicated factors bit-identical on every rank; the bytes counted; a NaN on one
rank refused by all. Rank 0 saves every gathered result to ``OUT/ws{N}.pt`` for the test to
compare with one process and with the other world sizes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import loram_ref
from bench.core.torchrun import close, leave
from bench.sharded.weights import full_weight
from loram_ref.sharded import SHARDED, Collectives, Ledger

#: (d_out, d_in, rank): tall and wide, sizes that split unevenly over 4 ranks, and 6 rows over
#: 4 ranks (chunks 2, 2, 2, 0: one rank holds an empty shard)
CASES = [(37, 23, 4), (18, 41, 4), (6, 40, 3)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def expected_bytes(name: str, world: int, m: int, n: int, dim: int, itemsize: int) -> int | None:
    """What the ledger must say for the methods whose traffic is a closed form."""
    if world == 1:
        return 0
    if name in ("noise_zeros", "gaussian", "orthogonal"):
        return 0
    if name.startswith("loram"):
        return round(2 * (world - 1) / world * 8)
    if SHARDED[name].gathers_weight:
        chunk = -(-(m if dim == 0 else n) // world)
        return (world - 1) * chunk * (n if dim == 0 else m) * itemsize
    return None


def main(out: Path) -> int:
    dist.init_process_group("gloo")
    world, me = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    saved = {}
    for dtype in DTYPES:
        for m, n, r in CASES:
            whole = full_weight(m, n, r, 7, dtype)
            for dim in (0, 1):
                for name, spec in SHARDED.items():
                    if loram_ref.get_initializer(name).rank_problem(m, n, r):
                        continue  # a rank the method refuses (PEFT's orthogonal: odd ones)
                    weight = distribute_tensor(whole, mesh, [Shard(dim)])
                    ledger = Ledger()
                    result = spec.fn(weight, r, 2.0, comm=Collectives(mesh.get_group(), ledger))
                    for label, tensor, sharded_dim in (("A", result.A, 1), ("B", result.B, 0)):
                        want = Shard(sharded_dim) if sharded_dim == dim else Replicate()
                        assert tensor.placements == (want,), f"{name} {label}: {tensor.placements} != {want}"
                        if isinstance(want, Replicate):  # every rank holds bit for bit the same factor
                            copies = [torch.empty_like(tensor.to_local()) for _ in range(world)]
                            dist.all_gather(copies, tensor.to_local().contiguous())
                            assert all(torch.equal(c, copies[0]) for c in copies), f"{name} {label} differs across ranks"
                    if result.residual is not None:
                        assert result.residual.placements == (Shard(dim),)
                    want_bytes = expected_bytes(name, world, m, n, dim, whole.element_size())
                    if want_bytes is not None:
                        assert ledger.bytes_sent == want_bytes, f"{name}: {ledger.bytes_sent} bytes, expected {want_bytes}"
                    full = result.full()
                    saved[(name, str(dtype), m, n, dim)] = (full.A, full.B, full.residual, ledger.bytes_sent)
    # NaN on rank 0's rows only: every rank refuses together (a rank raising alone would leave
    # the others waiting in a collective)
    bad = full_weight(37, 23, 4, 7, torch.float32)
    bad[0, 0] = float("nan")
    for name in ("loram_dst", "pissa_rsvd"):
        try:
            SHARDED[name].fn(distribute_tensor(bad, mesh, [Shard(0)]), 4)
        except ValueError as exc:
            assert "NaN" in str(exc), exc
        else:
            raise AssertionError(f"{name} accepted a NaN on rank 0's shard")
    if me == 0:
        torch.save(saved, out / f"ws{world}.pt")
    close()
    return 0


if __name__ == "__main__":
    leave(main(Path(sys.argv[1])))
