"""Every worker process gets a memory layout of its own (``bench.core.layout``).

Two tests, both about addresses: the real launcher path (forked from the fork server, a
worker's setup, torch tensors of every size from 64 B to 64 MiB, in the main thread and in
an OpenMP region), and a parent in the worst state for a shuffle (its heap full of free
chunks of every size class, holes between its mappings) forking children that shuffle as
the launchers do. A control fork without the shuffle shows the state the test builds does
pin every address, so the test cannot pass vacuously.

Chance of a false failure: the heap shift takes ~10^6 values and the mapping shift 2^18,
so two of 4 workers coincide on one allocation with probability about 6/2^18 ≈ 2e-5;
about 3e-4 over every allocation of both tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from .workers import SIZES, addresses

def test_forked_workers_allocate_every_size_at_addresses_of_their_own():
    from bench.core.launchers import ForkServerLauncher
    from bench.initcost.tasks import Task

    launcher = ForkServerLauncher(addresses, decode=dict)
    seen = [launcher.launch(Task("noise_zeros", 8, 8, 1), 60).run for _ in range(4)]
    for part in ("main", "after_pool"):
        for i, n in enumerate(SIZES):
            where = [s[part][i] for s in seen]
            assert len(set(where)) == 4, f"{part}: a tensor of {4 * n} bytes landed at {where}"


#: A parent that leaves free chunks of every heap size class and holes between its mappings
#: (what a fork server's imports leave), then forks children that report where their
#: allocations land (with the shuffle and settle of the launchers, or without: the control).
_HOSTILE_PARENT = textwrap.dedent("""
    import ctypes, json, mmap, os, sys
    from bench.core import layout
    libc = layout._libc()
    keep, drop = [], []
    for i in range(4000):                       # heap: free chunks of every class, 24 B to 60 KiB
        for p in (libc.malloc(24 + (i * 40) % 60000), libc.malloc(24 + (i * 16) % 1100)):
            (drop if i % 2 else keep).append(p)
    for p in drop:
        libc.free(p)
    maps = [libc.mmap(None, (1 + i % 37) * mmap.PAGESIZE * 16, 3, 0x22, -1, 0) for i in range(64)]
    for i, p in enumerate(maps):                # holes between mappings, 64 KiB to 2.3 MiB
        if i % 2:
            libc.munmap(p, (1 + i % 37) * mmap.PAGESIZE * 16)
    assert layout.holes(), "the parent made no hole"
    shuffle = sys.argv[1] == "shuffle"
    sizes = [24, 200, 1000, 5000, 40000, 70000, 300000, 5 << 20, 70 << 20]
    out = []
    for _ in range(4):
        r, w = os.pipe()
        if os.fork() == 0:
            os.close(r)
            if shuffle:
                layout.shuffle()
                layout.settle()
            os.write(w, json.dumps([libc.malloc(n) for n in sizes]).encode())
            os._exit(0)
        os.close(w)
        out.append(json.loads(os.read(r, 1 << 16)))
        os.wait()
    print(json.dumps(out))
""")


def _children(mode: str) -> list[list[int]]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1", "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", _HOSTILE_PARENT, mode], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_parent_full_of_free_chunks_and_holes_cannot_pin_a_shuffled_childs_allocations():
    control = _children("none")
    assert all(len({child[i] for child in control}) == 1 for i in range(len(control[0]))), \
        "without the shuffle every child should allocate where its siblings do"
    shuffled = _children("shuffle")
    for i in range(len(shuffled[0])):
        addresses = [child[i] for child in shuffled]
        assert len(set(addresses)) == 4, f"allocation {i} landed at {addresses} in the four children"
