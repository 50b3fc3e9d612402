"""The quick suite behind ``tox -e bench`` (about 10 minutes on 2 CPU cores).

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
from pathlib import Path

import torch

from .catalog import write_catalog
from .history import append_history
from .results import export_kind, new_run_id, outcome_summary, read_rows
from .runner import Runner, run_interleaved
from .suites import QUICK_LAYER, QUICK_LIMIT_S, QUICK_LOSS, QUICK_PRESETS, QUICK_TEMPLATE, init_tasks
from .tasks import Task


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
        export_kind(base_rows, Path(baseline), "init")
    export_kind(rows, out, "init")
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
        from .layer.run import run_layer_loss
        from .loss.run import run_loss

        layer_started = time.perf_counter()
        layer_rows = run_layer_loss(QUICK_LAYER.config(threads=threads), out, progress=progress, run_id=run_id)
        parts.append(outcome_summary([r for r in layer_rows if r.get("run_id") == run_id], "layer-loss runs"))
        print(f"layer-loss runs: {time.perf_counter() - layer_started:.0f} s", flush=True)
        loss_started = time.perf_counter()
        run_loss(QUICK_LOSS.config(threads=threads), out, progress=progress)
        print(f"loss runs: {time.perf_counter() - loss_started:.0f} s", flush=True)
    return parts
