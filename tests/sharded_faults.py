"""Sharded initializers that fail on rank 1, for the harness's failure tests
(loaded through ``LORAM_BENCH_SHARDED_PLUGINS``)."""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from loram_ref.sharded import SHARDED
from loram_ref.sharded.registry import register_sharded

_ANY = {torch.float32: 0.0, torch.float64: 0.0}


def _then_loram(weight, rank, scaling, comm):
    return SHARDED["loram_dst"].fn(weight, rank, scaling, comm=comm)


@register_sharded("raise_on_rank1", communication="as loram_dst", tolerance=_ANY, summary="test: ValueError on rank 1")
def raise_on_rank1(weight, rank, scaling=1.0, *, comm=None):
    if dist.get_rank() == 1:
        raise ValueError("planted failure on rank 1")
    return _then_loram(weight, rank, scaling, comm)


@register_sharded("hang_on_rank1", communication="as loram_dst", tolerance=_ANY, summary="test: rank 1 never returns")
def hang_on_rank1(weight, rank, scaling=1.0, *, comm=None):
    if dist.get_rank() == 1:
        time.sleep(3600)
    return _then_loram(weight, rank, scaling, comm)


@register_sharded("kill_rank1", communication="as loram_dst", tolerance=_ANY, summary="test: rank 1 dies by SIGKILL")
def kill_rank1(weight, rank, scaling=1.0, *, comm=None):
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return _then_loram(weight, rank, scaling, comm)
