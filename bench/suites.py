"""Suites as data: which initializer runs on which shapes, the defaults every command
shares (the loss benchmark's initializers, the reference initializers of comparisons),
and the quick suite of ``tox -e bench``. Initializer names are chosen here, once."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import loram_ref

from .checks import check_fits
from .shapes import LayerShape, model_shapes, unique_shapes
from .tasks import Task
from .worker import measurement_kwargs

DEFAULT_RANK = 16

#: Initializers of the loss benchmark when none are named (``loss``, ``quick``).
DEFAULT_LOSS_INITIALIZERS = ["noise_zeros", "pissa_rsvd", "loram_dst", "lora_sb"]
#: The report's reference for init-time speedups: the cost users pay today (full-SVD PiSSA).
SPEEDUP_REFERENCE = "pissa"
#: The reference of loss comparisons: PEFT's default initializer.
LOSS_REFERENCE = "noise_zeros"


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
    for shape, source in shapes.values():
        if rank > min(shape.d_out, shape.d_in):
            continue
        for name in names:
            tasks.append(replace(
                base, initializer=name, d_out=shape.d_out, d_in=shape.d_in, rank=rank, role=shape.role,
                count=shape.count, preset=source, dtype=dtype, device=device, threads=threads,
            ))
    # a worker holds W and, for an in-place initializer, the pristine copy that restores it
    needs: dict[str, int] = {}
    for t in tasks:
        copies = 2 if "inplace" in measurement_kwargs(loram_ref.get_initializer(t.initializer).fn) else 1
        key = f"{t.d_out}x{t.d_in} {t.dtype}"
        needs[key] = max(needs.get(key, 0), copies * t.d_out * t.d_in * t.itemsize)
    check_fits(needs, "cpu" if device == "cpu" else device)
    return tasks


#: The quick suite: small-model and 7B shapes, every initializer, CPU fp32, rank 16,
#: few values; slow cells beyond the limit are skipped by prediction and extrapolated.
QUICK_PRESETS = ["smollm2-135m", "llama-2-7b"]
#: 3 processes x 3 values on cheap cells (9 values reach p < 0.01 in ``compare``, and the
#: spread between processes is in the sample); slow cells get one process and fewer values.
#: Fidelity diagnostics on the small model's shapes only (up to 1536 x 576): at 4096 x 4096
#: their exact decompositions cost 38 s of the suite; ``loram-bench run`` computes them up
#: to 4096 x 4096.
QUICK_TEMPLATE = Task(initializer="", d_out=1, d_in=1, rank=DEFAULT_RANK, warmups=0, values=3, min_values=1,
                      value_budget_s=2.0, processes=3, max_fidelity_elements=1536 * 576)
QUICK_LIMIT_S = 60.0


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


@dataclass(frozen=True)
class LossSuite:
    """A loss grid as data: every (initializer, lr, seed) trains ``steps`` steps; the rest
    of the configuration is ``LossConfig``'s defaults (``overrides`` replace some)."""

    initializers: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    steps: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def runs(self) -> int:
        return len(self.initializers) * len(self.lrs) * len(self.seeds)

    def config(self, **options: Any):
        from .loss.run import LossConfig

        return LossConfig(initializers=list(self.initializers), lrs=list(self.lrs), seeds=list(self.seeds),
                          steps=self.steps, **{**self.overrides, **options})


#: The quick suite's loss part: its initializers x 3 seeds at lr 1e-3, 15 steps, eval every 5
#: (12 runs: 240 s measured on 2 cores with bf16 autocast).
QUICK_LOSS = LossSuite(tuple(DEFAULT_LOSS_INITIALIZERS), lrs=(1e-3,), seeds=(0, 1, 2), steps=15)
#: ``loram-bench full``: every initializer x 3 learning rates x 3 seeds x 40 steps
#: (72 runs: 3825 s measured on 2 cores with bf16 autocast, over its 60-minute target).
FULL_LOSS = LossSuite(tuple(sorted(loram_ref.INITIALIZERS)), lrs=(3e-4, 1e-3, 3e-3), seeds=(0, 1, 2), steps=40)


@dataclass(frozen=True)
class LayerSuite:
    """A layer-loss grid as data (``bench.layer.run.LayerConfig``'s other fields at their defaults)."""

    initializers: tuple[str, ...]
    alignments: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    presets: tuple[str, ...] = ()
    shapes: tuple[tuple[int, int], ...] = ()
    steps: int = 50
    init_limit_s: float = 60.0

    def config(self, **options: Any):
        from .layer.run import LayerConfig

        return LayerConfig(presets=list(self.presets), shapes=list(self.shapes), initializers=list(self.initializers),
                           alignments=list(self.alignments), lrs=list(self.lrs), seeds=list(self.seeds),
                           steps=self.steps, init_limit_s=self.init_limit_s, **options)


ALIGNMENTS = ("aligned", "random", "bottom")
#: The quick suite's layer-level part: SmolLM2-135M's attention shape and Llama-2-7B's
#: attention shape, the default loss initializers, every alignment, lr 1e-3, 3 seeds.
QUICK_LAYER = LayerSuite(tuple(DEFAULT_LOSS_INITIALIZERS), ALIGNMENTS, lrs=(1e-3,), seeds=(0, 1, 2),
                         shapes=((576, 576), (4096, 4096)))
#: ``loram-bench full``'s layer-level part: every unique shape of Llama-2-7B and Llama-3-70B,
#: every initializer, every alignment, 3 lrs, 3 seeds. Inits predicted past 30 s are taken
#: from the known SVD (full-SVD PiSSA) or skipped (LoRA-DA at the 70B MLP shapes).
FULL_LAYER = LayerSuite(tuple(sorted(loram_ref.INITIALIZERS)), ALIGNMENTS, lrs=(3e-4, 1e-3, 3e-3), seeds=(0, 1, 2),
                        presets=("llama-2-7b", "llama-3-70b"), init_limit_s=30.0)
