"""Checks of what a command is asked to do, made before any work starts.

Each names the flag (or the shape) and says what to do. Sizes that cannot fit this
machine are refused here rather than discovered as a failed row after minutes of work: a
thread count above the cores, a memory cap above the memory, a weight that alone (with
the pristine copy an in-place measurement keeps) exceeds the memory, ranks on more GPUs
than there are.
"""

from __future__ import annotations

import math
import os
import sys

GiB = 1 << 30


def available_cores() -> int:
    """The cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def total_memory_bytes() -> int:
    """This machine's memory: RAM plus swap."""
    import psutil

    return int(psutil.virtual_memory().total + psutil.swap_memory().total)


def gib(n: float) -> str:
    return f"{n / GiB:.3g} GiB"


def check_threads(value: int | None, flag: str = "--threads", device: str = "cpu") -> None:
    """A thread count: an integer >= 0 (0: the default), on CPU at most the available cores."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{flag} must be an integer >= 0 (0: the default), got {value!r}")
    cores = available_cores()
    if device == "cpu" and value > cores:
        raise ValueError(f"{flag} {value} exceeds the {cores} core(s) this process may use: threads beyond them only "
                         f"take turns and time the contention; use at most {cores}")


def check_memory_limit(limit_bytes: int | None, flag: str = "--memory-limit") -> None:
    """A per-worker memory cap no larger than the machine's memory (a cap above it never applies)."""
    if limit_bytes is None:
        return
    total = total_memory_bytes()
    if limit_bytes > total:
        raise ValueError(f"{flag} {gib(limit_bytes)} exceeds this machine's {gib(total)} of memory (RAM and swap): a "
                         f"cap above it never applies; give at most {gib(total)}, or leave the flag out")


def check_fits(needs: dict[str, int], device: str = "cpu", what: str = "W and the pristine copy kept to restore it"
               ) -> None:
    """``needs`` maps a description (a shape) to the bytes it needs at least; refuse the
    ones that exceed the device's memory."""
    if device == "cpu":
        total, where = total_memory_bytes(), "this machine's memory"
    else:
        import torch

        index = int(device.partition(":")[2] or 0)
        total, where = torch.cuda.get_device_properties(index).total_memory, f"{device}'s memory"
    over = {k: v for k, v in needs.items() if v > total}
    if over:
        listed = ", ".join(f"{k} ({gib(v)})" for k, v in sorted(over.items(), key=lambda kv: -kv[1])[:6])
        raise ValueError(f"{len(over)} shape(s) need more than {where} ({gib(total)}) for {what} alone: {listed}; "
                         "leave them out (smaller shapes, another dtype) or use a larger machine")


def check_world_size(world_sizes: list[int], device: str) -> None:
    """Ranks of a launch: on CUDA one GPU each (refused beyond the GPUs); on CPU they share
    the cores (a note when there are more ranks than cores: time then shows contention)."""
    if device.startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
        too_many = [w for w in world_sizes if w > gpus]
        if too_many:
            raise ValueError(f"--world-size {max(too_many)} needs one GPU per rank; this machine has {gpus}")
        return
    cores = available_cores()
    over = [w for w in world_sizes if w > cores]
    if over:
        print(f"note: --world-size {', '.join(map(str, over))} on {cores} core(s): the ranks share cores, so times "
              "show contention, not a cluster's speed", file=sys.stderr)


def check_seeds_and_lrs(seeds: list[int], lrs: list[float]) -> None:
    """The seeds and learning rates of a loss grid: at least one each, seeds integers >= 0,
    lrs finite and > 0, no value twice."""
    if not seeds or not lrs:
        raise ValueError("--seeds and --lrs each need at least one value")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"--seeds must be integers >= 0, got {seed!r}")
    for lr in lrs:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"--lrs must be finite and > 0, got {lr!r}")
    for flag, values in (("--seeds", seeds), ("--lrs", lrs)):
        if len(set(values)) != len(values):
            raise ValueError(f"{flag} lists a value twice: {values}")


def check_selection_seeds(selection_seeds: list[int], seeds: list[int], lrs: list[float]) -> None:
    """``--selection-seeds``: valid seeds, none of them also an evaluation seed (an lr must be
    chosen on other seeds than it is scored on)."""
    if not selection_seeds:
        return
    check_seeds_and_lrs(selection_seeds, lrs)
    overlap = sorted(set(selection_seeds) & set(seeds))
    if overlap:
        raise ValueError(f"--selection-seeds and --seeds share {overlap}: the lr must be chosen on other seeds "
                         "than it is scored on")
