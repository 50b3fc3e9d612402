"""How a ``torchrun`` rank of the harness ends.

A rank that leaves while another still talks to it makes gloo abort that one, and at
interpreter exit a gloo rank sometimes aborts on its own ("terminate called without an
active exception", from a C++ thread destroyed while the interpreter tears down: 2 of ~40
launches here). Either would make a launch whose every row is written look crashed. So a
rank that finished waits for the others at a barrier, destroys its process group, and leaves
without running the interpreter's finalization (:func:`leave`); a rank that failed leaves at
once with status 1, and ``torchrun`` ends the others, which may be waiting in a collective.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def close(group: dist.ProcessGroup | None = None) -> None:
    """Every rank here before any rank destroys the (default) process group."""
    dist.barrier(group=group)
    dist.destroy_process_group()


def leave(code: int) -> None:
    """Flush and exit with ``code`` without static destructors or ``atexit`` handlers."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
