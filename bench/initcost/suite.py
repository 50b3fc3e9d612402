"""The init-cost cells of a suite: one task per initializer and unique layer shape of each
model, checked to fit in memory before any worker starts."""

from __future__ import annotations

import sys
from dataclasses import replace

import loram_ref
from bench.core.checks import check_fits
from bench.core.defaults import DEFAULT_RANK
from bench.core.shapes import LayerShape, model_shapes, unique_shapes
from bench.initcost.tasks import Task


def init_tasks(
    sources: list[str],
    initializers: list[str] | None = None,
    *,
    rank: int = DEFAULT_RANK,
    dtype: str = "float32",
    device: str = "cpu",
    threads: int = 2,
    template: Task | None = None,
    extra_shapes: list[tuple[int, int]] | None = None,
) -> list[Task]:
    """One task per (initializer, unique shape of each source, and each of ``extra_shapes``).
    A shape shared by two sources is measured once; its per-model counts live in the
    shape catalog."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--rank must be an integer >= 1, got {rank!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    names = initializers or sorted(loram_ref.INITIALIZERS)
    for name in names:
        loram_ref.get_initializer(name)  # unknown names fail here, before any work
    shapes: dict[tuple[int, int], tuple[LayerShape, str]] = {}
    for source in sources:
        for s in unique_shapes(model_shapes(source)):
            shapes.setdefault((s.d_out, s.d_in), (s, source))
    for d_out, d_in in extra_shapes or []:
        shapes.setdefault((d_out, d_in), (LayerShape("shape", d_out, d_in), ""))
    base = template or Task(initializer="", d_out=1, d_in=1, rank=rank)
    too_small = [s for s, _ in shapes.values() if rank > min(s.d_out, s.d_in)]
    if too_small and len(too_small) == len(shapes):
        smallest = max(min(s.d_out, s.d_in) for s in too_small)
        raise ValueError(f"no task: every layer shape of {', '.join(map(str, sources)) or 'the --shape list'} has a side smaller than --rank "
                         f"{rank} (the largest min(d_out, d_in) is {smallest}); use a smaller --rank")
    if too_small:
        print(f"note: --rank {rank} exceeds min(d_out, d_in) of {len(too_small)} layer shape(s), not measured: "
              + ", ".join(f"{s.d_out}x{s.d_in} ({s.role})" for s in too_small), file=sys.stderr)
    tasks = []
    refused: dict[str, str] = {}
    for shape, source in shapes.values():
        if rank > min(shape.d_out, shape.d_in):
            continue
        for name in names:
            problem = loram_ref.get_initializer(name).rank_problem(shape.d_out, shape.d_in, rank)
            if problem:  # the registry's rank rule: a rank the method refuses at this shape
                refused.setdefault(name, problem)
                continue
            tasks.append(replace(
                base, initializer=name, d_out=shape.d_out, d_in=shape.d_in, rank=rank, role=shape.role,
                count=shape.count, preset=source, dtype=dtype, device=device, threads=threads,
            ))
    for name, problem in refused.items():
        print(f"note: {name} not measured where it refuses --rank {rank}: {problem}", file=sys.stderr)
    if not tasks:
        raise ValueError(f"no task: every initializer named refuses --rank {rank} at every shape "
                         f"({'; '.join(refused.values())})")
    # a worker holds W and, for an in-place initializer, the pristine copy that restores it
    needs: dict[str, int] = {}
    for t in tasks:
        copies = 2 if "inplace" in loram_ref.get_initializer(t.initializer).harness else 1
        key = f"{t.d_out}x{t.d_in} {t.dtype}"
        needs[key] = max(needs.get(key, 0), copies * t.d_out * t.d_in * t.itemsize)
    check_fits(needs, "cpu" if device == "cpu" else device)
    return tasks
