"""The manager: schedules tasks, runs each in fresh worker processes through a launcher
(``bench.core.launchers``), merges their runs into one cell and appends its row at once.

One worker per measurement (pyperf's manager/worker split): a crash, an OOM kill or a
hang costs that one row, recorded with its reason, and the run goes on. Rows already in
the results file are skipped, so an interrupted run resumes where it stopped. Before a
task runs, the cost law fitted to the same family's largest finished shape predicts its
time (``bench.core.costlaw``); a task predicted to exceed the time limit is recorded as
skipped, with the prediction, for the report to extrapolate.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from bench.core import costlaw
from bench.core.environment import environment
from bench.core.identity import family
from bench.core.launchers import Launcher, launcher_for, preload, worker_command
from bench.core.results import OK, SKIPPED, TIMEOUT, append_row, done_keys, new_run_id, resume
from bench.core.rows import FAILED, INIT
from bench.initcost.calibrate import Calibration, calibrate
from bench.initcost.schema import Measurement, ProcessRun, SchemaError, merge_runs
from bench.initcost.tasks import Task
from bench.initcost.worker import run_task
from loram_ref import get_initializer

#: the fork server imports this benchmark's worker module before it forks
preload("bench.initcost.worker")


@dataclass
class Runner:
    results_path: Path
    limit_s: float = 120.0
    worker_cmd: list[str] = field(default_factory=lambda: worker_command("bench.initcost.worker"))
    #: what a forked worker runs (a module-level function); tests substitute one that crashes or hangs
    worker_fn: Callable[[Task], dict[str, Any]] = run_task
    #: "auto" forks on CPU (Linux) and spawns for CUDA; "spawn" always spawns; or a Launcher
    launcher: str | Launcher = "auto"
    #: cap on each worker's extra memory (``RLIMIT_AS`` above its size at start), or None
    memory_limit_bytes: int | None = None
    progress: bool = True
    #: calibrate each (device, dtype, threads) before its first cell, for per-cell floors
    calibrate: bool = False
    calibrations: dict[tuple[str, str, int], Calibration | None] = field(default_factory=dict)
    run_id: str = field(default_factory=new_run_id)

    def launcher_for(self, task: Task) -> Launcher:
        if not isinstance(self.launcher, str):
            return self.launcher
        return launcher_for(task.device, self.worker_fn, self.worker_cmd, ProcessRun.from_dict, self.launcher)

    def run(self, tasks: list[Task]) -> list[dict[str, Any]]:
        """Run what is not yet done; return every row of the results file."""
        rows, pending = self.pending(tasks)
        bar = tqdm(pending, desc="init cost", unit="task", disable=not self.progress, dynamic_ncols=True)
        for task in bar:
            bar.set_postfix_str(f"{task.initializer} {task.d_out}x{task.d_in} {task.dtype} {task.device}")
            self.run_one(task, rows, bar.write)
        return rows

    def pending(self, tasks: list[Task]) -> tuple[list[dict[str, Any]], list[Task]]:
        """The rows already in the results file, and the tasks not yet done, smallest first
        (so each family's cost law exists before its large shapes come up)."""
        rows = resume(self.results_path)
        done = done_keys(rows, INIT, self.limit_s)
        pending = sorted((t for t in tasks if t.key not in done), key=lambda t: (t.d_out * t.d_in, t.d_out))
        if len(pending) < len(tasks):
            print(f"resuming: {len(tasks) - len(pending)} of {len(tasks)} measurements already in {self.results_path}", file=sys.stderr)
        return rows, pending

    def run_one(self, task: Task, rows: list[dict[str, Any]], say: Callable[[str], None] = print) -> dict[str, Any]:
        """Measure (or skip) one task, append its row to the file and to ``rows``."""
        predicted = self.predict(task, rows)
        if predicted is not None and predicted > self.limit_s:
            reason = (f"predicted {predicted:.0f} s > limit {self.limit_s:.0f} s" if predicted != float("inf")
                      else "a smaller shape of this initializer already exceeded the limit")
            cell = Measurement(task, SKIPPED, reason=reason, predicted_s=None if predicted == float("inf") else predicted)
        else:
            cell = self.execute(task, predicted)
        cell.run_id, cell.environment, cell.limit_s = self.run_id, environment(), self.limit_s
        self._set_floor(cell, say)
        row = cell.to_row()
        append_row(self.results_path, row)
        rows.append(row)
        if row["status"] != OK:
            say(f"  {task.initializer} {task.d_out}x{task.d_in}: {row['status']}: {row.get('reason', '')}")
        return row

    def _set_floor(self, cell: Measurement, say: Callable[[str], None]) -> None:
        """The cell's hardware floor from its initializer's declared work and the calibration
        of its device, dtype and thread count (taken once per run, in a fresh process)."""
        task = cell.task
        if not self.calibrate or cell.status != OK:
            return
        key = (task.device, task.dtype, task.threads)
        if key not in self.calibrations:
            try:
                self.calibrations[key] = calibrate(*key)
            except Exception as exc:  # noqa: BLE001 - a failed calibration costs the floors, not the run
                say(f"  calibration of {key} failed, no floors: {exc}")
                self.calibrations[key] = None
        cal = self.calibrations[key]
        work = get_initializer(task.initializer).work
        if cal is None or work is None:
            return
        cell.floor_s = cal.floor_s(work(task.d_out, task.d_in, task.rank, task.itemsize))
        cell.calibration = cal.fields()

    def predict(self, task: Task, rows: list[dict[str, Any]]) -> float | None:
        return predict_worker_s(task, rows, self.run_id)

    def execute(self, task: Task, predicted: float | None = None) -> Measurement:
        """Run the task's worker process(es) and merge them into one cell, or the failure.

        Up to ``task.processes`` processes, while their total wall time stays under
        ``2 · value_budget_s``: the spread between processes belongs in the sample.
        """
        launcher = self.launcher_for(task)
        started = time.perf_counter()
        runs = []
        while len(runs) < max(1, task.processes):
            # the fidelity diagnostic is deterministic: the first process computes it
            attempt = task if not runs else replace(task, max_fidelity_elements=0)
            outcome = launcher.launch(attempt, self.limit_s, self.memory_limit_bytes)
            if outcome.status != OK:
                return Measurement(task, outcome.status, reason=outcome.reason[:1000], predicted_s=predicted,
                                   phase=outcome.phase)
            runs.append(outcome.run)
            if time.perf_counter() - started > 2 * task.value_budget_s:
                break
        try:
            return merge_runs(task, runs, predicted_s=predicted)
        except SchemaError as exc:
            return Measurement(task, FAILED, reason=f"runs could not be merged: {exc}", predicted_s=predicted)


def predict_worker_s(task: Task, rows: list[dict[str, Any]], run_id: str) -> float | None:
    """Predicted wall time of one worker of ``task`` from finished rows of the same family
    (``inf`` when a smaller shape already timed out in run ``run_id``; None without a law)."""
    kin = [r for r in rows if "initializer" in r and family(r) == family(task)]
    size = costlaw.size_variable(task.initializer, task.d_out, task.d_in)
    if any(r.get("status") == TIMEOUT and costlaw.size_variable(task.initializer, r["d_out"], r["d_in"]) <= size
           and r.get("run_id") == run_id for r in kin):
        return float("inf")  # a smaller shape already ran out of time in this run
    same = [r for r in kin if r.get("status") == OK]
    law = costlaw.fit_rows(same, task.initializer, metric="median_s", largest=1)  # the extrapolation law
    if law is None:
        return None
    per_call = law.predict(size)
    calls = 1 + task.warmups + max(1, task.min_values)  # cold, warm-ups, values (each also a memory region)
    largest = max(same, key=lambda r: costlaw.size_variable(task.initializer, r["d_out"], r["d_in"]))
    cold_extra = max(0.0, (largest.get("first_s") or 0.0) - largest["median_s"])  # one-time library set-up
    return per_call * calls + cold_extra


def run_interleaved(first: Runner, second: Runner, tasks: list[Task]) -> tuple[list[dict], list[dict]]:
    """Measure every task with both runners back to back, alternating which goes first
    (A B, B A, A B, ...), so that slow drift of the machine (frequency, neighbours,
    thermal state) lands on both sides alike: asv's interleaved rounds, per task.

    Returns ``(rows of first, rows of second)``. Two runners of the same code give an
    A/A comparison; runners whose launchers run two checkouts give an A/B one.
    """
    rows_a, pending_a = first.pending(tasks)
    rows_b, pending_b = second.pending(tasks)
    keys_b = {t.key for t in pending_b}
    queue = [t for t in pending_a if t.key in keys_b]
    bar = tqdm(queue, desc="init cost (interleaved)", unit="pair", disable=not first.progress, dynamic_ncols=True)
    for i, task in enumerate(bar):
        bar.set_postfix_str(f"{task.initializer} {task.d_out}x{task.d_in}")
        pair = ((first, rows_a), (second, rows_b)) if i % 2 == 0 else ((second, rows_b), (first, rows_a))
        for runner, rows in pair:
            runner.run_one(task, rows, bar.write)
    return rows_a, rows_b
