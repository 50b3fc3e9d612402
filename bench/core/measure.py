"""Measurement primitives: synchronized timing and peak CPU / GPU memory of a region.

* Time: wall clock with ``torch.cuda.synchronize()`` on both edges on CUDA (GPU SVD
  backends synchronize with the host, so events alone would miss host work), plus CUDA
  events as a cross-check.
* Peak CPU memory: the kernel's own high-water mark. Writing ``5`` to
  ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS, so ``VmHWM`` after the
  region is the region's peak; the extra memory is that peak minus the RSS at entry.
  Where the reset is unavailable, ``ru_maxrss`` minus the entry RSS is used and flagged:
  in a fresh worker it is exact once the region's peak exceeds everything before it.
  Never tracemalloc: it cannot see torch tensors.
* Peak GPU memory: ``reset_peak_memory_stats`` then ``max_memory_allocated`` (live
  tensors) and ``max_memory_reserved`` (the caching allocator's footprint), relative to
  their values at entry.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_kib(key: str, pid: int | None = None) -> int | None:
    """A ``/proc/PID/status`` field in KiB (this process's without ``pid``); None if unreadable."""
    try:
        for line in (_STATUS if pid is None else Path(f"/proc/{pid}/status")).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    kib = status_kib("VmRSS")
    if kib is None:  # not Linux: psutil knows the platform's way
        import psutil

        return psutil.Process().memory_info().rss
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's ``VmHWM`` to the current RSS. False where that is not supported."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _ru_maxrss_bytes() -> int:
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class CpuPeak:
    """Peak RSS of a region: ``extra_bytes`` above the RSS at entry, and how it was read."""

    entry_bytes: int = 0
    peak_bytes: int = 0
    method: str = ""

    @property
    def extra_bytes(self) -> int:
        return max(0, self.peak_bytes - self.entry_bytes)


@contextmanager
def cpu_peak() -> Iterator[CpuPeak]:
    result = CpuPeak()
    exact = reset_peak_rss()
    result.entry_bytes = current_rss_bytes()
    result.method = "vmhwm-reset" if exact else "ru_maxrss"
    try:
        yield result
    finally:
        hwm = status_kib("VmHWM") if exact else None
        result.peak_bytes = hwm * 1024 if hwm is not None else _ru_maxrss_bytes()


@dataclass
class GpuPeak:
    allocated_bytes: int = 0
    reserved_bytes: int = 0
    entry_allocated_bytes: int = 0
    entry_reserved_bytes: int = 0


@contextmanager
def gpu_peak(device: torch.device) -> Iterator[GpuPeak]:
    """Peak allocator memory on ``device`` above its entry level (zeros on CPU)."""
    result = GpuPeak()
    if device.type != "cuda":
        yield result
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result.entry_allocated_bytes = torch.cuda.memory_allocated(device)
    result.entry_reserved_bytes = torch.cuda.memory_reserved(device)
    try:
        yield result
    finally:
        torch.cuda.synchronize(device)
        result.allocated_bytes = torch.cuda.max_memory_allocated(device) - result.entry_allocated_bytes
        result.reserved_bytes = torch.cuda.max_memory_reserved(device) - result.entry_reserved_bytes


@dataclass
class Timing:
    wall_s: float
    event_s: float | None = None  # CUDA event time, GPU stream only


def timed(fn: Callable[[], object], device: torch.device) -> Timing:
    """Run ``fn`` once; wall time synchronized on CUDA, with CUDA events as a cross-check."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        return Timing(wall_s=wall, event_s=start.elapsed_time(stop) / 1000.0)
    t0 = time.perf_counter()
    fn()
    return Timing(wall_s=time.perf_counter() - t0)
