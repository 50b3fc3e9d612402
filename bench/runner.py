"""The manager: runs each task in a fresh worker process and appends its row at once.

One worker per measurement (pyperf's manager/worker split): a crash, an OOM kill or a
hang costs that one row, recorded with its reason, and the run goes on. On CPU the
worker is forked from a fork server, a clean process that has imported torch and run no
kernel (saves ~2 s of imports per measurement; the child's first call is still cold;
forking this process instead could deadlock a child in an OpenMP pool the parent had
started). CUDA cannot survive a fork, so CUDA tasks run in a spawned
``python -m bench.worker``. Rows already in
the results file are skipped, so an interrupted run resumes where it stopped. Before a
task runs, the cost law fitted to the same initializer's largest finished shape
predicts its time (``bench.costlaw``); a task predicted to exceed the time limit is recorded as skipped, with the
prediction, for the report to extrapolate.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from . import costlaw
from .environment import environment
from .results import CRASHED, FAILED, OK, SKIPPED, TIMEOUT, append_row, done_keys, read_rows
from .tasks import Task
from .worker import RESULT_PREFIX, run_task

#: glibc raises its mmap threshold after freeing a large block, after which freed memory
#: stays in RSS and a later region's peak hides inside it. A fixed threshold keeps every
#: large tensor mmapped, so RSS (and VmHWM) follow what is live.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class Runner:
    results_path: Path
    limit_s: float = 120.0
    worker_cmd: list[str] = field(default_factory=lambda: [sys.executable, "-m", "bench.worker"])
    #: what a forked worker runs (a module-level function: it is pickled to the fork
    #: server); tests substitute one that crashes or hangs
    worker_fn: Callable[[Task], dict[str, Any]] = run_task
    #: "auto" forks on CPU (Linux) and spawns for CUDA; "spawn" always spawns
    launcher: str = "auto"
    progress: bool = True
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])

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
        (so each initializer's cost law exists before its large shapes come up)."""
        rows = read_rows(self.results_path)
        done = done_keys(rows)
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
            row = self._row(task, SKIPPED, predicted_s=None if predicted == float("inf") else predicted, reason=reason)
        else:
            row = self.execute(task, predicted)
        append_row(self.results_path, row)
        rows.append(row)
        if row["status"] != OK:
            say(f"  {task.initializer} {task.d_out}x{task.d_in}: {row['status']}: {row.get('reason', '')}")
        return row

    def predict(self, task: Task, rows: list[dict[str, Any]]) -> float | None:
        """Predicted wall time of the whole worker from finished rows of the same kind."""
        kin = [
            r for r in rows
            if r.get("initializer") == task.initializer and r.get("device") == task.device
            and r.get("dtype") == task.dtype and r.get("rank") == task.rank and r.get("threads") == task.threads
        ]
        size = costlaw.size_variable(task.initializer, task.d_out, task.d_in)
        if any(r.get("status") == TIMEOUT and costlaw.size_variable(task.initializer, r["d_out"], r["d_in"]) <= size
               and r.get("run_id") == self.run_id for r in kin):
            return float("inf")  # a smaller shape already ran out of time in this run
        same = [r for r in kin if r.get("status") == OK]
        law = costlaw.fit_rows(same, task.initializer, metric="median_s", largest=1)  # the extrapolation law
        if law is None:
            return None
        per_call = law.predict(size)
        calls = 1 + task.warmups + task.min_values + 1  # cold, warm-ups, values, memory pass
        largest = max(same, key=lambda r: costlaw.size_variable(task.initializer, r["d_out"], r["d_in"]))
        cold_extra = max(0.0, largest["first_s"] - largest["median_s"])  # one-time library set-up
        return per_call * calls + cold_extra

    def execute(self, task: Task, predicted: float | None = None) -> dict[str, Any]:
        """Run the task's worker process(es); one row with every value, or the failure."""
        fork = self.launcher == "auto" and task.device == "cpu" and "forkserver" in multiprocessing.get_all_start_methods()
        started = time.perf_counter()
        results: list[dict[str, Any]] = []
        while len(results) < max(1, task.processes):
            status, result, reason = (self._forked if fork else self._spawned)(task)
            if status != OK:
                return self._row(task, status, predicted_s=predicted, worker_wall_s=time.perf_counter() - started,
                                 reason=reason[:1000])
            results.append(result)
            if time.perf_counter() - started > 2 * task.value_budget_s:
                break
        merged = _merge(results)
        merged.pop("status", None)
        return self._row(task, OK, predicted_s=predicted, **merged)

    def _forked(self, task: Task) -> tuple[str, dict | None, str]:
        ctx = _fork_server()
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_fork_entry, args=(self.worker_fn, task, send), daemon=True)
        proc.start()
        send.close()
        message = None
        if receive.poll(self.limit_s):
            try:
                message = receive.recv()
            except EOFError:  # the child died without sending
                message = None
        proc.join(timeout=5 if message is not None else 0.5)
        if proc.is_alive():
            proc.kill()
            proc.join()
            if message is None:
                return TIMEOUT, None, f"worker exceeded the {self.limit_s:.0f} s limit and was killed"
        receive.close()
        if message is None:
            return CRASHED, None, _exit_cause(proc.exitcode)
        if message.get("status") == FAILED:
            return FAILED, None, message["reason"]
        return OK, message, ""

    def _spawned(self, task: Task) -> tuple[str, dict | None, str]:
        try:
            proc = subprocess.run(
                self.worker_cmd, input=json.dumps(task.to_dict()), capture_output=True, text=True,
                timeout=self.limit_s, env={**os.environ, **WORKER_ENV},
            )
        except subprocess.TimeoutExpired:
            return TIMEOUT, None, f"worker exceeded the {self.limit_s:.0f} s limit and was killed"
        result = next(
            (json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)),
            None,
        )
        if proc.returncode != 0 or result is None:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            status = CRASHED if proc.returncode != 0 else FAILED
            return status, None, f"{_exit_cause(proc.returncode)}: {tail}"
        return OK, result, ""

    def _row(self, task: Task, status: str, **fields: Any) -> dict[str, Any]:
        base = task.to_dict()
        base["options"] = json.dumps(base["options"], sort_keys=True)
        return {
            "kind": "init",
            "run_id": self.run_id,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "task_key": task.key,
            **base,
            "status": status,
            "reason": "",
            **fields,
            **environment(),
        }


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the results of several worker processes of the same task."""
    if len(results) == 1:
        return {**results[0], "processes": 1}
    values = [v for r in results for v in r["values_s"]]
    merged = dict(results[0])
    merged.update(
        processes=len(results),
        values_s=values,
        event_values_s=[v for r in results for v in r.get("event_values_s", [])],
        first_values_s=[r["first_s"] for r in results],  # one cold call per process
        median_s=statistics.median(values),
        mean_s=statistics.fmean(values),
        stdev_s=statistics.stdev(values) if len(values) > 1 else 0.0,
        worker_wall_s=sum(r.get("worker_wall_s", 0.0) for r in results),
    )
    for key in ("peak_cpu_extra_bytes", "peak_rss_bytes", "peak_gpu_allocated_bytes", "peak_gpu_reserved_bytes"):
        merged[key] = max(r.get(key) or 0 for r in results)
    return merged


def run_interleaved(first: Runner, second: Runner, tasks: list[Task]) -> tuple[list[dict], list[dict]]:
    """Measure every task with both runners back to back, alternating which goes first
    (A B, B A, A B, ...), so that slow drift of the machine (frequency, neighbours,
    thermal state) lands on both sides alike: asv's interleaved rounds, per task.

    Two runners of the same code give an A/A comparison; runners whose ``worker_cmd``
    runs two checkouts (``launcher="spawn"``) give an A/B one.
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


_FORK_SERVER = None


def _fork_server():
    """The forkserver context, its server preloading torch and the worker module.

    The server is started here, with :data:`WORKER_ENV` in its environment: the OpenMP
    runtime reads its settings when torch is loaded, in the server, before any fork.
    """
    global _FORK_SERVER
    if _FORK_SERVER is None:
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "loram_ref", "bench.worker"])
        saved = {k: os.environ.get(k) for k in WORKER_ENV}
        os.environ.update(WORKER_ENV)
        try:
            forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        _FORK_SERVER = ctx
    return _FORK_SERVER


def _fixed_mmap_threshold() -> None:
    """``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` in the forked worker, as ``MALLOC_MMAP_THRESHOLD_``
    does at start-up (a no-op where the server already had it, kept for other launchers)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD = -3 (glibc)
    except (OSError, AttributeError):
        pass


def _exit_cause(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    return f"exit code {code}"


def _fork_entry(fn: Callable[[Task], dict[str, Any]], task: Task, send) -> None:
    """Child side of a forked worker: run, send one message, exit without cleanup."""
    import traceback

    _fixed_mmap_threshold()
    try:
        message = fn(task)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a recorded row
        tail = traceback.format_exc().strip().splitlines()[-3:]
        message = {"status": FAILED, "reason": f"{type(exc).__name__}: {exc} | " + " | ".join(tail)}
    send.send(message)
    send.close()
    os._exit(0)
