"""The worker process protocol every benchmark's workers follow.

A launcher (``bench.core.launchers``) runs one task per fresh process, forked from the fork
server or spawned as ``python -m <worker module>``. A worker:

* starts in the "setup" phase (:func:`begin_setup`: its heap settled into a layout of its
  own, its thread count, its device), and names the phase it is in (:data:`PHASE`) so that
  a failure says where it happened;
* sends exactly one message: its result, or :func:`failure_message` of the exception
  (``oom`` or ``failed``, with the phase); a spawned worker prints it as one line prefixed
  with :data:`RESULT_PREFIX` (:func:`serve`);
* runs under an address-space cap (:func:`apply_memory_limit`) when the manager sets one.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from bench.core.rows import FAILED, OOM

#: The prefix of a spawned worker's one result line on stdout.
RESULT_PREFIX = "LORAM_BENCH_RESULT "


#: The phase a worker is in, read by the launcher's failure handler: "setup" (weight,
#: statistics), "initializer" (every call of the initializer, timed or in the memory
#: pass) or "diagnostics" (the harness's own checks after the measurements).
PHASE = {"now": "setup"}


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation, as the allocators report it: ``torch.OutOfMemoryError``
    (CUDA), ``MemoryError``, or the CPU allocator's "can't allocate memory"."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def failure_message(exc: BaseException, tail: list[str]) -> dict[str, Any]:
    """The message a worker sends for an exception: ``oom`` or ``failed``, with its phase."""
    phase = PHASE["now"]
    what = "the harness's own diagnostics" if phase == "diagnostics" else f"the {phase} phase"
    if is_out_of_memory(exc):
        return {"status": OOM, "phase": phase, "reason": f"out of memory in {what}: {type(exc).__name__}: {str(exc)[:300]}"}
    return {"status": FAILED, "phase": phase, "reason": f"{type(exc).__name__}: {exc} | " + " | ".join(tail)}


def apply_memory_limit(limit_bytes: int | None) -> None:
    """Cap this process's address space at its current size plus ``limit_bytes``
    (``RLIMIT_AS``): an allocation beyond it fails as out of memory instead of the
    machine's OOM killer ending the run. The cap counts virtual memory, so it is a
    bound on extra memory, not an exact RSS limit."""
    if not limit_bytes:
        return
    import resource

    from bench.core.measure import status_kib

    size = (status_kib("VmSize") or 0) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + int(limit_bytes), resource.RLIM_INFINITY))


def begin_setup(threads: int, device: str) -> torch.device:
    """A worker's first step: the "setup" phase, its heap drained again so that what it
    allocates from here on sits in the process's own layout (``bench.core.layout.settle``), its
    thread count, its device (CUDA initialized)."""
    from bench.core.layout import settle

    PHASE["now"] = "setup"
    settle()
    torch.set_num_threads(threads)
    resolved = torch.device(device)
    if resolved.type == "cuda":
        torch.cuda.init()
    return resolved


#: The spawned worker's memory cap in bytes (set by the spawn launcher).
MEMORY_LIMIT_ENV = "LORAM_BENCH_MEMORY_LIMIT"


def serve(from_dict, fn) -> int:
    """A spawned worker's life: the task as JSON on stdin (``from_dict`` builds it), the
    memory cap from the environment, ``fn(task)`` or its failure as one prefixed line on stdout."""
    import os
    import traceback

    from bench.core.layout import shuffle

    task = from_dict(json.loads(sys.stdin.read()))
    shuffle()  # a layout of its own, before the memory cap (bench.core.layout)
    apply_memory_limit(int(os.environ.get(MEMORY_LIMIT_ENV) or 0))
    try:
        result = fn(task)
    except Exception as exc:  # noqa: BLE001 - reported to the manager as this task's failure
        result = failure_message(exc, traceback.format_exc().strip().splitlines()[-3:])
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


