"""A memory layout of its own for every worker process.

Where a buffer lands changes how fast a kernel on it runs (cache-set and page-table
conflicts, 4 KiB aliasing between buffers): on this machine the small noise-init cells ran
at 150 µs in one layout and 300 µs in another. A forked worker inherits the fork server's
address space, and the steps a worker takes before it measures are the same every time,
so without help every worker of a fork server would draw the same layout, and two sides
of a comparison could sit in two speed modes for a whole run (Stabilizer's argument:
Curtsinger & Berger, ASPLOS 2013). :func:`shuffle` gives the calling process a layout of
its own, drawn from ``os.urandom``, before anything is measured; the launchers call it in
every worker, forked or spawned.

Why shifting "the next allocation" is not enough: glibc serves a request from the free
chunks the parent left (tcache, fast bins, bins) before it touches the top of the heap,
and the kernel places a new mapping in the highest hole between existing mappings that
fits it. Both are fixed by the parent's history, so a random block allocated at the top
moves nothing that is served from a hole. :func:`shuffle` therefore

1. drains the heap: it allocates (and keeps) every free chunk below the current top, by
   requests of every size class from 64 MiB down to the smallest chunk, each size until
   glibc answers from the top; from then on every heap allocation comes from the top;
2. moves the top by a random number of bytes (16-byte steps, up to 16 MiB of address
   space: 256 blocks below the mmap threshold and one of random size; only their header
   pages are touched, about 1 MiB);
3. fills every hole between the mappings of the mmap area (up to 1 GiB each; never the
   gap below the stack, which the stack grows into) with an inaccessible reservation, so
   the kernel can place a new mapping only below the lowest one;
4. reserves a random number of pages (up to 2^18, 1 GiB of address space, no memory)
   there, so every later mapping lands a random number of pages lower.

Every later allocation of the calling thread, heap or mmap, small or large, is then at a
random offset (sub-page for heap chunks, whole pages for mappings; glibc puts an mmapped
chunk's data 16 bytes into its first page, so the offset within a page of a large buffer
is fixed by glibc, not by the layout). Not moved: Python's own small-object pools
(interpreter objects, not tensor data) and the arenas glibc gives threads started later
(placed by mmap below the reservation, but aligned to 64 MiB by glibc).

A worker's start-up after the shuffle (unpickling its task, importing its tree's
``loram_ref``) frees chunks and mappings it inherited, at the parent's addresses; the
worker's setup therefore calls :func:`settle`, which drains the heap and fills the holes
again, so what the setup and the measurement allocate comes from the shifted top.

Reservations are ``PROT_NONE``: address space, not memory. They count towards
``RLIMIT_AS``, so workers shuffle before their memory cap is applied (the cap is relative
to the size at that moment); a hole :func:`settle` cannot fill under the cap is left.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

#: glibc's mmap threshold in every worker (``MALLOC_MMAP_THRESHOLD_``, ``bench.core.launchers``):
#: requests from here up are mmapped when no free chunk holds them.
MMAP_THRESHOLD = 65536
#: The largest request the drain makes (free chunks larger than this are not expected in
#: a heap whose large allocations are mmapped).
_DRAIN_MAX = 1 << 26
#: A hole between mappings larger than this is not filled (it is the free area itself).
HOLE_MAX = 1 << 30
#: The random top shift: up to this many blocks of :data:`_SHIFT_BLOCK` bytes, plus one of random size.
_SHIFT_BLOCKS = 256
_SHIFT_BLOCK = 63 * 1024
#: The random reservation: 1 to this many pages.
RESERVE_PAGES = 1 << 18
#: A bound on the drain's requests (a heap with more free chunks than this is drained partly).
_MAX_REQUESTS = 2_000_000

_PROT_NONE = 0
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_NORESERVE, _MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x4000, 0x100000
_MAP_FAILED = ctypes.c_void_p(-1).value


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@dataclass(frozen=True)
class LayoutShift:
    """What :func:`shuffle` did: chunks drained, the heap shift in bytes, holes filled, pages reserved."""

    applied: bool
    drained_chunks: int = 0
    drained_bytes: int = 0
    heap_shift_bytes: int = 0
    holes_filled: int = 0
    reserved_pages: int = 0
    why_not: str = ""


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
        libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.restype, libc.munmap.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]
        libc.malloc_trim.restype, libc.malloc_trim.argtypes = ctypes.c_int, [ctypes.c_size_t]
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None  # not glibc (or a glibc before 2.33): no shuffle
    return libc


def _drain_sizes() -> list[int]:
    """Request sizes, largest first: halving from 64 MiB to the mmap threshold, then by
    about 15 % to 1 KiB, then every 16-byte chunk class down to the smallest (24 bytes)."""
    sizes, s = [], _DRAIN_MAX
    while s > MMAP_THRESHOLD:
        sizes.append(s)
        s //= 2
    s = MMAP_THRESHOLD - 64
    while s > 1040:
        sizes.append(s & ~15)
        s = int(s * 0.85)
    sizes.extend(range(1032, 23, -16))
    return sizes


def _drain_heap(libc) -> tuple[int, int]:
    """Allocate and keep every free chunk of the main heap below its top. Returns
    ``(chunks, bytes)`` taken from the free lists."""
    libc.malloc_trim(0)  # merges the fast bins into the bins (and returns the top's excess)
    top_start = libc.sbrk(0) - libc.mallinfo2().keepcost  # keepcost: the main arena's top chunk
    heap_start = top_start - libc.mallinfo2().arena
    chunks = taken = requests = 0
    for size in _drain_sizes():
        while requests < _MAX_REQUESTS:
            requests += 1
            p = libc.malloc(size)
            if not p:
                break
            if heap_start <= p < top_start:  # an old free chunk: keep it, ask again
                chunks += 1
                taken += size
                continue
            if size >= MMAP_THRESHOLD and not (heap_start <= p < libc.sbrk(0)):
                libc.free(p)  # a fresh mapping: no free chunk this large is left; give it back
            break  # from the top (kept) or mmapped (returned): this size is drained
    return chunks, taken


def _shift_heap(libc, rng: random.Random) -> int:
    blocks = rng.randrange(_SHIFT_BLOCKS)
    last = rng.randrange(_SHIFT_BLOCK // 16) * 16
    for _ in range(blocks):
        libc.malloc(_SHIFT_BLOCK - 8)
    if last:
        libc.malloc(last)
    return blocks * _SHIFT_BLOCK + last


def _maps() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[5] if len(parts) > 5 else ""))
    return sorted(out)


def holes() -> list[tuple[int, int]]:
    """``(address, length)`` of every hole between two mappings of the mmap area: above the
    heap, below the stack (the gap right below the stack is left: the stack grows into it),
    at most :data:`HOLE_MAX` long."""
    maps = _maps()
    heap_end = max((end for _, end, name in maps if name == "[heap]"), default=0)
    stack = min((start for start, _, name in maps if name == "[stack]"), default=None)
    out = []
    for (_, end, _), (start, _, name) in zip(maps, maps[1:]):
        gap = start - end
        if gap <= 0 or end < heap_end or name == "[stack]" or (stack is not None and start > stack):
            continue
        if gap <= HOLE_MAX:
            out.append((end, gap))
    return out


def _fill_holes(libc, above: int = 0) -> int:
    """Fill the holes at or above ``above``; the number filled."""
    filled = 0
    flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED_NOREPLACE
    for address, length in holes():
        if address < above:
            continue
        p = libc.mmap(address, length, _PROT_NONE, flags, -1, 0)
        if p in (None, _MAP_FAILED):
            continue  # raced by another thread's mapping: leave it
        if p != address:  # a kernel without MAP_FIXED_NOREPLACE took it as a hint
            libc.munmap(p, length)
            break
        filled += 1
    return filled


#: Where :func:`shuffle` put its random reservation in this process (``settle`` fills only
#: the holes above it: those below were made after the shuffle, at shifted addresses).
_RESERVATION: dict[str, int] = {}


def _reserve(libc, rng: random.Random) -> int:
    pages = rng.randint(1, RESERVE_PAGES)
    while pages:
        p = libc.mmap(None, pages * mmap.PAGESIZE, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if p not in (None, _MAP_FAILED):
            _RESERVATION.update(address=p, pid=os.getpid())
            return pages
        pages //= 2  # an address-space cap of the user's: a smaller shift
    return 0


def settle() -> LayoutShift:
    """Drain the heap and fill the holes again, without a new shift: the chunks and mappings
    a worker's start-up freed (its parent's, at the parent's addresses) are taken before
    its setup allocates, so the setup and the measurement allocate at the shifted top.
    Called by ``bench.initcost.worker.begin_setup``, after the imports a worker makes."""
    libc = _libc()
    if libc is None:
        return LayoutShift(False, why_not="not glibc >= 2.33 on Linux")
    chunks, taken = _drain_heap(libc)
    # only the holes above this process's reservation: a hole below it (a thread's arena is
    # aligned to 64 MiB, and the part above it unmapped) sits at a shifted address already,
    # and filling it would put the next mapping at the arena's aligned bottom
    above = _RESERVATION.get("address", 0) if _RESERVATION.get("pid") == os.getpid() else 0
    return LayoutShift(True, chunks, taken, holes_filled=_fill_holes(libc, above))


def shuffle() -> LayoutShift:
    """Give this process a memory layout of its own (see the module docstring). Call it
    before starting threads: a thread's first allocation maps an arena of its own, and one
    mapped between the hole filling and the reservation would leave a hole above it."""
    libc = _libc()
    if libc is None:
        return LayoutShift(False, why_not="not glibc >= 2.33 on Linux")
    rng = random.Random(os.urandom(16))  # forked children share the parent's random state
    chunks, taken = _drain_heap(libc)
    shift = _shift_heap(libc, rng)
    filled = _fill_holes(libc)
    pages = _reserve(libc, rng)
    return LayoutShift(True, chunks, taken, shift, filled, pages)


@contextmanager
def reusable_heap(threshold: int = 1 << 30) -> Iterator[None]:
    """Inside: allocations up to ``threshold`` bytes come from (and return to) the heap
    instead of fresh mappings. A worker's fixed :data:`MMAP_THRESHOLD` (the layouts'
    determinism) makes each of a training loop's many tensors above 64 KiB a new mapping,
    its pages faulted in and unmapped again at every step (the layer task's steps took
    twice as long). Restored on exit, so the measurements that follow see the worker's
    usual heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        set_option = libc.mallopt
    except (OSError, AttributeError):
        yield
        return
    set_option(-3, int(threshold))  # M_MMAP_THRESHOLD
    set_option(-1, int(threshold))  # M_TRIM_THRESHOLD: keep freed heap memory for the next step
    try:
        yield
    finally:
        set_option(-3, MMAP_THRESHOLD)
        set_option(-1, 2 * MMAP_THRESHOLD)  # glibc's default trim threshold
