"""One ``torchrun`` launch of a list of sharded tasks, watched and killed at the limit.

:meth:`ShardedLauncher.launch` starts ``python -m torch.distributed.run --standalone
--nproc-per-node N --max-restarts 0 -m bench.sharded.worker PLAN`` in its own process
group, and polls the ranks' progress files: the task in progress is the last one a rank
started. It returns a :class:`LaunchOutcome`: the task it was on when the launch died
(its status, reason, phase) or ``None`` when every task finished.

* a task running past ``limit_s`` (counted from its start, setup included): the whole
  process group is killed; the row is a timeout, with each rank's peak RSS so far (read
  from ``/proc/PID/status`` before the kill, a lower bound of what the call needed);
* a rank that raised: its reason from its progress file (``failed``, ``oom``);
* a rank that died without a word (a signal, the OOM killer): ``crashed``, with
  ``torchrun``'s summary of the exit codes;
* a launch that never started a task within ``startup_s``: every task of the launch is
  charged, with ``torchrun``'s output.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.core.children import child_env
from bench.core.launchers import WORKER_ENV
from bench.core.measure import status_kib
from bench.core.results import read_rows
from bench.core.rows import CRASHED, FAILED, TIMEOUT
from bench.sharded.tasks import ShardedTask

POLL_S = 0.2


@dataclass
class LaunchOutcome:
    """How a launch ended: ``failed_key`` is the task it died on (``None``: all finished)."""

    failed_key: str | None = None
    status: str = ""
    reason: str = ""
    phase: str = ""
    peak_cpu_extra_bytes: list[int | None] = field(default_factory=list)
    #: the launch died before starting any task (every task of the plan is charged)
    before_start: bool = False


def _events(folder: Path) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for path in folder.glob("rank*.jsonl"):
        match = re.fullmatch(r"rank(\d+)\.jsonl", path.name)
        if match:
            out[int(match.group(1))] = read_rows(path)
    return out


def _current(events: dict[int, list[dict[str, Any]]]) -> tuple[str | None, float | None]:
    """The task rank 0 (or the furthest rank) last started, and when."""
    starts = [e for evs in events.values() for e in evs if e.get("event") == "start"]
    if not starts:
        return None, None
    last = max(starts, key=lambda e: e["time"])
    first_of_it = min(e["time"] for e in starts if e["task_key"] == last["task_key"])
    return last["task_key"], first_of_it


def _peaks_so_far(events: dict[int, list[dict[str, Any]]], key: str, world: int) -> list[int | None]:
    """Per rank: peak RSS since the cold call began minus its entry RSS (``None`` before it)."""
    out: list[int | None] = []
    for rank in range(world):
        measured = [e for e in events.get(rank, []) if e.get("event") == "measure" and e.get("task_key") == key]
        hwm = status_kib("VmHWM", measured[-1]["pid"]) if measured else None
        out.append(max(0, hwm * 1024 - measured[-1]["entry_rss"]) if hwm is not None else None)
    return out


def _torchrun_summary(log: Path) -> str:
    """Which rank ended how, from torchrun's failure report ("rank 1: exit -9 (SIGKILL)"), else its last lines."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    ends = re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)[^\n]*?(\(SIG\w+\))?\s*$", text, re.MULTILINE)
    if ends:
        return "; ".join(f"rank {r}: exit {code}" + (f" {sig}" if sig else "") for r, code, sig in ends)
    return " | ".join(text.strip().splitlines()[-4:])[-600:]


@dataclass
class ShardedLauncher:
    """Launches the ranks with ``torchrun`` (``python -m torch.distributed.run``)."""

    python: str = sys.executable
    startup_s: float = 180.0

    def command(self, world_size: int, plan_path: Path) -> list[str]:
        return [self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
                "--max-restarts=0", "-m", "bench.sharded.worker", str(plan_path)]

    def environment(self, threads: int) -> dict[str, str]:
        """The ranks' environment: the init workers' allocator and OpenMP settings, ``threads`` per
        rank, the working folder off the import path (``bench.core.children``)."""
        return child_env({**WORKER_ENV, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})

    def launch(self, tasks: list[ShardedTask], plan: dict[str, Any], folder: Path, limit_s: float,
               on_poll: Callable[[], None] | None = None) -> LaunchOutcome:
        """Run ``tasks`` in one launch (one world size, one device); ``folder`` is a fresh scratch
        folder; ``on_poll`` is called at every poll (progress output)."""
        world = tasks[0].world_size
        progress = folder / "progress"
        progress.mkdir(parents=True, exist_ok=True)
        plan_path = folder / "plan.json"
        plan_path.write_text(json.dumps({**plan, "tasks": [t.to_dict() for t in tasks], "progress_dir": str(progress),
                                         "limit_s": limit_s, "device": tasks[0].device}))
        log = folder / "torchrun.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(self.command(world, plan_path), stdout=out, stderr=subprocess.STDOUT,
                                    env=self.environment(tasks[0].threads), start_new_session=True)
            began = time.monotonic()
            try:
                while proc.poll() is None:
                    time.sleep(POLL_S)
                    if on_poll:
                        on_poll()
                    events = _events(progress)
                    key, started = _current(events)
                    if key is None and time.monotonic() - began > self.startup_s:
                        _kill(proc)
                        return LaunchOutcome(tasks[0].key, TIMEOUT, f"no rank started within {self.startup_s:.0f} s: "
                                             + _torchrun_summary(log), "setup", before_start=True)
                    if key is not None and time.time() - started > limit_s:
                        peaks = _peaks_so_far(events, key, world)
                        _kill(proc)
                        phase = "initializer" if any(p is not None for p in peaks) else "setup"
                        return LaunchOutcome(key, TIMEOUT, f"exceeded the {limit_s:.3g} s limit (slowest rank); "
                                             "all ranks killed", phase, peaks)
            except BaseException:  # Ctrl-C: no rank may outlive the manager
                _kill(proc)
                raise
        if proc.returncode == 0:
            return LaunchOutcome()
        events = _events(progress)
        # a rank's own error; a collective's "peer closed the connection" only echoes another rank's death
        failed = [e for evs in events.values() for e in evs if e.get("event") == "failed" and not e.get("peer_lost")]
        if failed:
            first = min(failed, key=lambda e: e["time"])
            return LaunchOutcome(first["task_key"], first.get("status") or FAILED, first.get("reason", ""),
                                 first.get("phase", ""))
        key, _ = _current(events)
        summary = _torchrun_summary(log)
        if key is None:
            return LaunchOutcome(tasks[0].key, CRASHED, f"the launch ended (exit {proc.returncode}) before any task "
                                 f"started: {summary}", "setup", before_start=True)
        killed = re.search(r"exit -9|SIGKILL", summary)
        reason = ("a rank was killed by signal 9 (out of memory?): " if killed else
                  f"a rank died without a Python error (torchrun exit {proc.returncode}): ")
        measured = any(e.get("event") == "measure" and e.get("task_key") == key for evs in events.values() for e in evs)
        return LaunchOutcome(key, CRASHED, reason + summary, "initializer" if measured else "setup")


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process under it, and reap it.

    The ranks are found as torchrun's descendants before anything is killed (torchrun may
    start them in sessions of their own, out of reach of a process-group kill; a rank
    orphaned by a kill of its parent alone would go on waiting in a collective forever).
    """
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in family:
        try:
            child.kill()
        except psutil.Error:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=10)
