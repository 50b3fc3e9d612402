"""Suites as data (which initializers, shapes, learning rates and seeds each benchmark runs
in ``quick`` and ``full``) and the quick suite behind ``tox -e bench`` (about 7 minutes on 2
CPU cores).

1. Init cost of every initializer on the unique shapes of a small model and Llama-2-7B
   (CPU, fp32, rank 16), cells predicted past the limit skipped and extrapolated.
2. The layer-level task (``bench.layer``) at SmolLM2-135M's and Llama-2-7B's attention
   shapes (576x576, 4096x4096): the default loss initializers x every alignment x 3 seeds
   at lr 1e-3, and its findings (``layer_loss_findings.csv``).
3. Short loss runs on SmolLM2-135M of the default loss initializers x 3 seeds (each seed
   one batch order shared by all: a paired design), 15 steps of 4 x 64 tokens, and their
   verdict (``loss_stats.csv``).
4. The run's init rows appended to ``history.jsonl`` (the report's trend) and the shape
   catalog written; the command line then builds the HTML report.

A rerun into the same folder resumes: measurements already there are not repeated
(delete the folder, or pass another ``--out``, for a fresh run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import loram_ref
from bench.core.catalog import write_catalog
from bench.core.defaults import DEFAULT_LOSS_INITIALIZERS, DEFAULT_RANK, QUICK_PRESETS
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


#: The quick suite's loss part: its initializers x 3 seeds at lr 1e-3, 15 steps, eval every 5
#: (12 runs: 240 s measured on 2 cores with bf16 autocast).
QUICK_LOSS = LossSuite(tuple(DEFAULT_LOSS_INITIALIZERS), lrs=(1e-3,), seeds=(0, 1, 2), steps=15)
#: ``loram-bench full``: every initializer x 3 learning rates x 3 seeds x 40 steps
#: (72 runs: 3825 s measured on 2 cores with bf16 autocast, over its 60-minute target).
FULL_LOSS = LossSuite(tuple(sorted(loram_ref.INITIALIZERS)), lrs=(3e-4, 1e-3, 3e-3), seeds=(0, 1, 2), steps=40)


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

    def config(self, **options: Any):
        return LayerConfig(presets=list(self.presets), shapes=list(self.shapes), initializers=list(self.initializers),
                           alignments=list(self.alignments), lrs=list(self.lrs), seeds=list(self.seeds),
                           steps=self.steps, init_limit_s=self.init_limit_s, **options)


#: The quick suite's layer-level part: SmolLM2-135M's attention shape and Llama-2-7B's
#: attention shape, the default loss initializers, every alignment, lr 1e-3, 3 seeds.
QUICK_LAYER = LayerSuite(tuple(DEFAULT_LOSS_INITIALIZERS), ALIGNMENTS, lrs=(1e-3,), seeds=(0, 1, 2),
                         shapes=((576, 576), (4096, 4096)))
#: ``loram-bench full``'s layer-level part: every unique shape of Llama-2-7B and Llama-3-70B,
#: every initializer, every alignment, 3 lrs, 3 seeds. Inits predicted past 30 s are taken
#: from the known SVD (full-SVD PiSSA) or skipped (LoRA-DA at the 70B MLP shapes).
FULL_LAYER = LayerSuite(tuple(sorted(loram_ref.INITIALIZERS)), ALIGNMENTS, lrs=(3e-4, 1e-3, 3e-3), seeds=(0, 1, 2),
                        presets=("llama-2-7b", "llama-3-70b"), init_limit_s=30.0)


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


def run_quick(out: Path, *, progress: bool = True, skip_loss: bool = False, baseline: Path | None = None
              ) -> list[tuple[str, bool]]:
    """Run the quick suite into ``out``. With ``baseline``, every init measurement is also
    taken, interleaved, into ``baseline`` (an A/A pair for ``loram-bench compare``).
    Returns each worker-measured part's summary line and whether all of its rows failed."""
    started = time.perf_counter()
    threads = min(2, torch.get_num_threads())
    tasks = init_tasks(QUICK_PRESETS, rank=QUICK_TEMPLATE.rank, threads=threads, template=QUICK_TEMPLATE)
    run_id = new_run_id()
    measure_init(tasks, out, baseline, sources=QUICK_PRESETS, progress=progress, calibrate=True, run_id=run_id)
    print(f"init cost: {len(tasks)} measurements in {time.perf_counter() - started:.0f} s", flush=True)
    parts = [outcome_summary([r for r in read_rows(out / "init.jsonl") if r.get("run_id") == run_id], "init measurements")]
    if not skip_loss:

        layer_started = time.perf_counter()
        layer_rows = run_layer_loss(QUICK_LAYER.config(threads=threads), out, progress=progress, run_id=run_id)
        parts.append(outcome_summary([r for r in layer_rows if r.get("run_id") == run_id], "layer-loss runs"))
        print(f"layer-loss runs: {time.perf_counter() - layer_started:.0f} s", flush=True)
        loss_started = time.perf_counter()
        run_loss(QUICK_LOSS.config(threads=threads), out, progress=progress)
        print(f"loss runs: {time.perf_counter() - loss_started:.0f} s", flush=True)
    return parts
