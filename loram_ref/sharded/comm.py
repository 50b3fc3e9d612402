"""The collectives the sharded initializers use, each counted where it is called.

Every byte a sharded initializer sends goes through :class:`Collectives`, which adds it to
a :class:`Ledger`. The count is what the bandwidth-optimal ring schedule (the one NCCL and
gloo use for large messages) sends per rank, for a message of ``N`` bytes on ``p`` ranks:

* ``all_reduce``: reduce-scatter then all-gather, ``2·(p−1)/p·N``;
* ``all_gather`` of a per-rank block of ``S`` bytes: ``(p−1)·S``;
* nothing for ``p = 1``.

These are the bytes the algorithm puts on the wire, independent of the backend's actual
schedule (a tree or a single-message path for tiny tensors sends as much or a little
more); the benchmark records them per rank (``bench.sharded``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Ledger:
    """Bytes sent by this rank and the number of calls, per collective."""

    bytes_sent: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    bytes_by_op: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, nbytes: float) -> None:
        sent = int(round(nbytes))
        self.bytes_sent += sent
        self.calls[op] = self.calls.get(op, 0) + 1
        self.bytes_by_op[op] = self.bytes_by_op.get(op, 0) + sent


class Collectives:
    """Counted collectives on one process group (the weight's 1-D device mesh)."""

    def __init__(self, group: dist.ProcessGroup | None = None, ledger: Ledger | None = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.index = dist.get_rank(group)
        self.ledger = ledger if ledger is not None else Ledger()

    def _nbytes(self, tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce ``tensor`` in place over the ranks and return it (every rank gets the same values)."""
        if self.world > 1:
            self.ledger.add("all_reduce", 2 * (self.world - 1) / self.world * self._nbytes(tensor))
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def all_true(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Whether ``flag`` holds on every rank (one all-reduced int on ``device``, the weight's:
        nccl reduces only GPU tensors): a check every rank fails together."""
        value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
        return int(self.all_reduce(value, dist.ReduceOp.SUM)) == 0 if self.world > 1 else flag

    def all_gather(self, block: torch.Tensor) -> torch.Tensor:
        """``(p, *block.shape)``: every rank's ``block`` (equal shapes), stacked in rank order."""
        flat = torch.empty((self.world * block.shape[0], *block.shape[1:]), dtype=block.dtype, device=block.device)
        out = flat.view(self.world, *block.shape)
        if self.world == 1:
            out[0].copy_(block)
            return out
        self.ledger.add("all_gather", (self.world - 1) * self._nbytes(block))
        _ALL_GATHER(flat, block.contiguous(), group=self.group)  # blocks concatenated along dim 0
        return out


#: ``all_gather_single`` where this torch has it (``all_gather_into_tensor`` is deprecated there).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
