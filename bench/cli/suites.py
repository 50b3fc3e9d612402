"""Suites as data (which initializers, shapes, learning rates and seeds each benchmark runs
in ``quick`` and ``full``) and the quick suite behind ``tox -e bench``.

1. Init cost of every initializer on the unique shapes of a small model and Llama-2-7B
   (CPU, fp32, rank 16), cells predicted past the limit skipped and extrapolated.
2. The layer-level task (``bench.layer``): SmolLM2-135M's and Llama-2-7B's attention shapes
   with every alignment, and a small (target rank, scale) plane with the LoRAM gain arms at
   SmolLM2's MLP shape; the default loss initializers, three starting lrs (bracketed), 3
   seeds; capacity floors and findings (``layer_loss_findings.csv``).
3. Short loss runs on SmolLM2-135M of the default loss initializers x 3 seeds (each seed
   one batch order shared by all: a paired design), 12 steps of 4 x 64 tokens scored on 32
   eval blocks, and their verdict (``loss_stats.csv``).
4. The run's init rows appended to ``history.jsonl`` (the report's trend) and the shape
   catalog written; the command line then builds the HTML report.

``loram-bench full`` runs :data:`FULL_LAYER` (``--part layer``) and :data:`FULL_LOSS`
(``--part model``), each alone or both. A rerun into the same folder resumes: measurements
already there are not repeated (delete the folder, or pass another ``--out``, for a fresh run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import loram_ref
from bench.core.catalog import write_catalog
from bench.core.defaults import (
    DEFAULT_LOSS_INITIALIZERS,
    DEFAULT_RANK,
    PEER_LOSS_INITIALIZERS,
    QUICK_PRESETS,
    QUICK_SMALL_ONLY,
)
from bench.core.results import new_run_id, outcome_summary, read_rows
from bench.initcost.history import append_history
from bench.initcost.pyperf_format import export_init
from bench.initcost.runner import Runner, run_interleaved
from bench.initcost.suite import init_tasks
from bench.initcost.tasks import Task
from bench.layer.config import LayerConfig
from bench.layer.run import run_layer_loss  # (registers its worker for preloading before the init cells fork)
from bench.layer.spec import ALIGNMENTS
from bench.loss.config import LossConfig
from bench.loss.run import run_loss

#: The quick suite's init cells: the quick presets, every initializer, CPU fp32, rank 16, few
#: values; slow cells beyond the limit are skipped by prediction and extrapolated.
#: 3 processes x 3 values on cheap cells (9 values reach p < 0.01 in ``compare``, and the
#: spread between processes is in the sample); slow cells get one process and fewer values.
#: Fidelity diagnostics on the small model's shapes only (up to 1536 x 576): at 4096 x 4096
#: their exact decompositions cost 38 s of the suite; ``loram-bench run`` computes them up
#: to 4096 x 4096.
QUICK_TEMPLATE = Task(initializer="", d_out=1, d_in=1, rank=DEFAULT_RANK, warmups=0, values=3, min_values=1,
                      value_budget_s=2.0, processes=3, max_fidelity_elements=1536 * 576)
QUICK_LIMIT_S = 60.0


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
        return LossConfig(initializers=list(self.initializers), lrs=list(self.lrs), seeds=list(self.seeds),
                          steps=self.steps, **{**self.overrides, **options})


#: The quick suite's loss part: its initializers x 3 seeds at lr 1e-3, 12 steps (1 of warmup),
#: the 32 eval blocks scored at step 0 and after the last step (12 runs, ~24 s each on 2
#: cores); one lr, so every verdict is provisional (the quick design: it shows the machinery,
#: not a ranking).
QUICK_LOSS = LossSuite(tuple(DEFAULT_LOSS_INITIALIZERS), lrs=(1e-3,), seeds=(0, 1, 2), steps=12,
                       overrides={"eval_every": 12, "bracket": False})
#: ``loram-bench full --part model``: the default loss initializers, the five-lr grid on one
#: selection seed (extended where an optimum sits at an edge), then 5 evaluation seeds at the
#: chosen lrs, 40 steps with 3 % warmup and linear decay, 32 eval blocks scored at steps 0,
#: 20 and 40. A run takes ~50 s on 2 cores (40 steps of 4 x 64 tokens and the evals), so
#: about 46 runs fit the 60-minute budget: one selection seed and four initializers are what
#: the budget buys (more would need fewer steps).
FULL_LOSS = LossSuite(tuple(DEFAULT_LOSS_INITIALIZERS), lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2), seeds=(0, 1, 2, 3, 4),
                      steps=40, overrides={"selection_seeds": [1000], "eval_every": 20})
#: ``loram-bench full --part peers``: the same design for PEFT's other initializers, MiLoRA and
#: LoRA-One, with noise-zeros as the reference (10 initializers: about 100 runs, ≈ 85 minutes
#: on 2 cores at FULL_LOSS's ~50 s per run, plus one shared statistics pass per seed).
FULL_LOSS_PEERS = replace(FULL_LOSS, initializers=tuple(PEER_LOSS_INITIALIZERS))


@dataclass(frozen=True)
class LayerSuite:
    """A layer-loss grid as data (``bench.layer.config.LayerConfig``'s other fields at their defaults)."""

    initializers: tuple[str, ...]
    alignments: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    presets: tuple[str, ...] = ()
    shapes: tuple[tuple[int, int], ...] = ()
    steps: int = 50
    init_limit_s: float = 60.0
    selection_seeds: tuple[int, ...] = ()
    target_ranks: tuple[int, ...] = ()
    target_scales: tuple[float, ...] = ()
    loram_gains: tuple[float, ...] = ()
    label: str = ""

    @property
    def cells(self) -> int:
        return max(1, len(self.target_ranks)) * max(1, len(self.target_scales))

    def describe(self) -> str:
        shapes = len(self.config().layer_shapes())
        selection = (f"lrs chosen on {len(self.selection_seeds)} selection seeds, scored on {len(self.seeds)}"
                     if self.selection_seeds else f"{len(self.seeds)} seeds (lrs chosen on the same)")
        gains = f", LoRAM gains {'/'.join(f'{g:g}' for g in self.loram_gains)} with matched noise-zeros" if self.loram_gains else ""
        return (f"{self.label or 'layer task'}: {shapes} shape(s) x {self.cells} (target rank, scale) cell(s) x "
                f"{len(self.alignments)} alignment(s) x {len(self.initializers)} initializers, {len(self.lrs)} starting lrs "
                f"(bracketed), {selection}, {self.steps} steps{gains}")

    def config(self, **options: Any):
        return LayerConfig(presets=list(self.presets), shapes=list(self.shapes), initializers=list(self.initializers),
                           alignments=list(self.alignments), lrs=list(self.lrs), seeds=list(self.seeds),
                           steps=self.steps, init_limit_s=self.init_limit_s, selection_seeds=list(self.selection_seeds),
                           target_ranks=list(self.target_ranks), target_scales=list(self.target_scales),
                           loram_gains=list(self.loram_gains), **options)


#: The starting lr grid of the full suites: five half-decade steps, extended where an optimum sits at an edge.
FULL_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
#: The (target rank, target scale) plane: k below, at and above the LoRA rank r = 8, and
#: ‖ΔW*‖/‖W‖ from 0.01 to 2 in five (near log-spaced) steps.
PLANE_RANKS = (4, 8, 16)
PLANE_SCALES = (0.01, 0.04, 0.15, 0.5, 2.0)

#: The quick suite's layer-level part: SmolLM2-135M's attention shape and Llama-2-7B's,
#: the default loss initializers, every alignment, three starting lrs (bracketed), 3 seeds
#: (the lr chosen on the same seeds: the quick design); a small (k, scale) plane and the
#: LoRAM gain arms at SmolLM2's MLP shape.
QUICK_LAYER = (
    LayerSuite(tuple(DEFAULT_LOSS_INITIALIZERS), ALIGNMENTS, lrs=(1e-3, 3e-3, 1e-2), seeds=(0, 1, 2),
               shapes=((576, 576), (4096, 4096)), label="shapes and alignments"),
    LayerSuite(tuple(DEFAULT_LOSS_INITIALIZERS), ("random",), lrs=(1e-3, 3e-3, 1e-2), seeds=(0, 1, 2),
               shapes=((1536, 576),), target_ranks=(4, 16), target_scales=(0.05, 0.5), loram_gains=(0.5, 1.0, 2.0),
               label="(target rank, scale) plane and LoRAM gains"),
)
#: ``loram-bench full --part layer``: every initializer; lrs chosen on 3 selection seeds and
#: scored on 20 evaluation seeds; the (k, scale) plane at SmolLM2-135M's MLP shape; every
#: alignment at the unique shapes of SmolLM2-135M's attention and MLP and Llama-2-7B's
#: attention and MLP at the default cell (k = 16, scale 0.01); the LoRAM gains at
#: Llama-2-7B's attention shape, at the default scale (where LoRAM's capacity floor is near 1)
#: and at 0.5 (where it is not, so the gains can show what magnitude does in training).
#: Inits predicted past 30 s are taken from the known SVD (full-SVD PiSSA) or skipped.
#: Every registered initializer the layer task can run (its registry entry says why not, else).
LAYER_TASK_INITIALIZERS = tuple(sorted(n for n, s in loram_ref.INITIALIZERS.items() if s.layer_task_excluded is None))
_FULL_LAYER_COMMON = dict(lrs=FULL_LRS, seeds=tuple(range(20)), selection_seeds=(1000, 1001, 1002), init_limit_s=30.0)
FULL_LAYER = (
    LayerSuite(LAYER_TASK_INITIALIZERS, ("random",), shapes=((1536, 576),), target_ranks=PLANE_RANKS,
               target_scales=PLANE_SCALES, label="(target rank, scale) plane", **_FULL_LAYER_COMMON),
    LayerSuite(LAYER_TASK_INITIALIZERS, ALIGNMENTS,
               shapes=((576, 576), (1536, 576), (4096, 4096), (11008, 4096)), label="shapes and alignments",
               **_FULL_LAYER_COMMON),
    LayerSuite(LAYER_TASK_INITIALIZERS, ("random",), shapes=((4096, 4096),), target_scales=(0.01, 0.5),
               loram_gains=(0.25, 0.5, 1.0, 2.0), label="LoRAM gains (magnitude by intervention)", **_FULL_LAYER_COMMON),
)


def measure_init(tasks: list[Task], out: Path, baseline: Path | None = None, *, sources: list[str],
                 progress: bool = True, limit_s: float = QUICK_LIMIT_S, run_id: str | None = None,
                 **runner_options) -> int:
    """Measure ``tasks`` into ``out`` (and, interleaved, into ``baseline``), export both
    folders' tables and append ``out``'s new rows to its history. Returns the rows added."""
    write_catalog(out, sources)
    runner = Runner(out / "init.jsonl", limit_s=limit_s, progress=progress, run_id=run_id or new_run_id(),
                    **runner_options)
    if baseline is None:
        rows = runner.run(tasks)
    else:
        write_catalog(Path(baseline), sources)
        base_runner = Runner(Path(baseline) / "init.jsonl", limit_s=limit_s, progress=progress, **runner_options)
        base_rows, rows = run_interleaved(base_runner, runner, tasks)
        export_init(base_rows, Path(baseline))
    export_init(rows, out)
    added = append_history([r for r in rows if r.get("run_id") == runner.run_id], out / "history.jsonl")
    print(f"history: {added} rows appended to {out / 'history.jsonl'}", flush=True)
    return added


def quick_init_tasks(threads: int) -> list[Task]:
    """The quick suite's init cells: every initializer on the first preset's shapes, and on the
    others every initializer but :data:`QUICK_SMALL_ONLY` (a cell shared by two presets is
    measured once)."""
    tasks = init_tasks(QUICK_PRESETS[:1], rank=QUICK_TEMPLATE.rank, threads=threads, template=QUICK_TEMPLATE)
    rest = [n for n in sorted(loram_ref.INITIALIZERS) if n not in QUICK_SMALL_ONLY]
    seen = {t.key for t in tasks}
    more = init_tasks(QUICK_PRESETS[1:], rest, rank=QUICK_TEMPLATE.rank, threads=threads, template=QUICK_TEMPLATE)
    return tasks + [t for t in more if t.key not in seen]


def run_quick(out: Path, *, progress: bool = True, skip_loss: bool = False, baseline: Path | None = None
              ) -> list[tuple[str, bool]]:
    """Run the quick suite into ``out``. With ``baseline``, every init measurement is also
    taken, interleaved, into ``baseline`` (an A/A pair for ``loram-bench compare``).
    Returns each worker-measured part's summary line and whether all of its rows failed."""
    started = time.perf_counter()
    threads = min(2, torch.get_num_threads())
    tasks = quick_init_tasks(threads)
    run_id = new_run_id()
    measure_init(tasks, out, baseline, sources=QUICK_PRESETS, progress=progress, calibrate=True, run_id=run_id)
    print(f"init cost: {len(tasks)} measurements in {time.perf_counter() - started:.0f} s", flush=True)
    parts = [outcome_summary([r for r in read_rows(out / "init.jsonl") if r.get("run_id") == run_id], "init measurements")]
    if not skip_loss:

        layer_started = time.perf_counter()
        layer_rows: list[dict[str, Any]] = []
        for suite in QUICK_LAYER:
            print(suite.describe(), flush=True)
            layer_rows = run_layer_loss(suite.config(threads=threads), out, progress=progress, run_id=run_id)
        parts.append(outcome_summary([r for r in layer_rows if r.get("run_id") == run_id], "layer-loss runs"))
        print(f"layer-loss runs: {time.perf_counter() - layer_started:.0f} s", flush=True)
        loss_started = time.perf_counter()
        run_loss(QUICK_LOSS.config(threads=threads), out, progress=progress)
        print(f"loss runs: {time.perf_counter() - loss_started:.0f} s", flush=True)
    return parts
