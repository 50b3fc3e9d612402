"""The sharded suite: tasks from a config, launched one world size at a time, resumed, and
relaunched past a failure, every outcome a row of ``sharded.jsonl``."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.core.checks import check_fits, check_threads, check_world_size
from bench.core.environment import environment
from bench.core.results import append_row, done_keys, new_run_id, read_rows, resume
from bench.core.rows import CRASHED, OK, SHARDED
from bench.core.shapes import ITEMSIZE
from bench.sharded.launch import LaunchOutcome, ShardedLauncher
from bench.sharded.plugins import load_plugins
from bench.sharded.tasks import PLACEMENTS, ShardedRow, ShardedTask

RESULTS_FILE = "sharded.jsonl"
#: Failed launches keep their torchrun output here, under the results folder.
LOGS = "sharded-logs"


@dataclass
class ShardedConfig:
    """What ``loram-bench sharded`` measures: every (initializer, shape, world size, placement)."""

    initializers: list[str]
    shapes: list[tuple[int, int]]
    world_sizes: list[int]
    placements: list[str] = field(default_factory=lambda: list(PLACEMENTS))
    rank: int = 16
    scaling: float = 1.0
    dtype: str = "float32"
    device: str = "cpu"
    #: per rank; ``None``: the machine's cores divided among the ranks (CPU), 1 (CUDA)
    threads: int | None = None
    seed: int = 0
    repeats: int = 3
    check: bool = True
    limit_s: float = 300.0

    def threads_for(self, world_size: int) -> int:
        if self.threads:
            return self.threads
        return 1 if self.device.startswith("cuda") else max(1, (os.cpu_count() or 1) // world_size)

    def tasks(self) -> list[ShardedTask]:
        """Validated tasks, grouped by world size (one launch each), then shape, placement, initializer."""
        from loram_ref.sharded import get_sharded

        load_plugins()
        if not self.initializers:
            raise ValueError("--initializers is empty: name at least one sharded initializer")
        for name in self.initializers:
            get_sharded(name)  # an unknown name fails here, listing the known ones
        if not self.shapes:
            raise ValueError("sharded needs --shape or --preset (e.g. --shape 28672x8192)")
        if not self.world_sizes or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.world_sizes):
            raise ValueError(f"--world-size must be integers >= 1, got {self.world_sizes}")
        for p in self.placements:
            if p not in PLACEMENTS:
                raise ValueError(f"--placement must be among {', '.join(PLACEMENTS)}, got {p!r}")
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"--dtype must be one of {', '.join(ITEMSIZE)}, got {self.dtype!r}")
        for flag, value, low in (("--rank", self.rank, 1), ("--repeats", self.repeats, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
        if not (self.limit_s > 0 and self.limit_s < float("inf")):
            raise ValueError(f"--limit must be > 0 and finite (seconds), got {self.limit_s}")
        for m, n in self.shapes:
            if self.rank > min(m, n):
                raise ValueError(f"--rank {self.rank} exceeds min(d_out, d_in) of shape {m}x{n}")
        check_threads(self.threads, "--threads (per rank)", "cuda" if self.device.startswith("cuda") else "cpu")
        check_world_size(self.world_sizes, self.device)
        # the shards of W, and on rank 0 the whole W and its single-process result for the check
        copies = 3 if self.check else 1
        check_fits({f"{m}x{n} {self.dtype}": copies * m * n * ITEMSIZE[self.dtype] for m, n in self.shapes},
                   "cpu" if self.device == "cpu" else "cuda:0",
                   "the shards" + (", and rank 0's whole W and single-process result of the check" if self.check else ""))
        return [ShardedTask(initializer=name, d_out=m, d_in=n, world_size=w, placement=p, rank=self.rank,
                            scaling=self.scaling, dtype=self.dtype, device=self.device, threads=self.threads_for(w),
                            seed=self.seed, repeats=self.repeats, check=self.check)
                for w in self.world_sizes for (m, n) in self.shapes for p in self.placements
                for name in self.initializers]


def describe(row: dict[str, Any]) -> str:
    """One line per finished row (the progress output)."""
    head = f"{row['initializer']:<12} {row['shape']:>11} ws={row['world_size']} {row['placement']:<3}"
    if row["status"] != OK:
        return f"{head} {row['status'].upper()}: {row['reason'][:200]}"
    diff = "" if row.get("max_diff") is None else f", max diff {row['max_diff']:.1e} (tol {row.get('tolerance') or 0:.0e})"
    return (f"{head} {row['time_s']:.3g} s (slowest rank), peak {_bytes(row.get('max_peak_cpu_extra_bytes'))}/rank, "
            f"sent {_bytes(row.get('max_bytes_sent'))}/rank{diff}")


def _bytes(value: float | None) -> str:
    value = float(value or 0)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def run_sharded(config: ShardedConfig, out: Path, *, launcher: ShardedLauncher | None = None,
                say: Callable[[str], None] = print, run_id: str | None = None) -> list[dict[str, Any]]:
    """Measure every pending task of ``config`` into ``out/sharded.jsonl``; return all its rows
    (this run's carry ``run_id``)."""
    tasks = config.tasks()
    path = Path(out) / RESULTS_FILE
    done = done_keys(resume(path, say), SHARDED, config.limit_s)
    pending = [t for t in tasks if t.key not in done]
    if len(pending) < len(tasks):
        say(f"{len(tasks) - len(pending)} of {len(tasks)} sharded rows already in {path}; measuring {len(pending)}")
    launcher = launcher or ShardedLauncher()
    run_id = run_id or new_run_id()
    plan = {"results": str(path.resolve()), "run_id": run_id, "environment": environment()}
    groups: dict[tuple[int, str], list[ShardedTask]] = {}
    for t in pending:
        groups.setdefault((t.world_size, t.device), []).append(t)
    seen = {"rows": len(read_rows(path)), "size": path.stat().st_size if path.exists() else 0}

    def report() -> None:
        """Print the rows that landed since the last call; called at every poll, it re-reads the file only when it grew."""
        size = path.stat().st_size if path.exists() else 0
        if size != seen["size"]:
            seen["size"] = size
            seen["rows"] = _report_new(path, seen["rows"], say)
    for (world, device), group in groups.items():
        remaining = list(group)
        while remaining:
            say(f"launching {world} rank(s) on {device} ({remaining[0].threads} thread(s) each): {len(remaining)} row(s)")
            scratch = Path(tempfile.mkdtemp(prefix="loram-sharded-"))
            try:
                outcome = launcher.launch(remaining, plan, scratch, config.limit_s, on_poll=report)
                report()
                finished = {r["task_key"] for r in read_rows(path) if r.get("run_id") == run_id}
                if outcome.failed_key is not None and outcome.failed_key in finished:
                    # the launch died after that row was written: not the row's fault; go on with the rest
                    remaining = [t for t in remaining if t.key not in finished]
                    continue
                if outcome.failed_key is None:
                    missing = [t for t in remaining if t.key not in finished]
                    if missing:  # torchrun said success but a row is missing: never silently
                        outcome = LaunchOutcome(missing[0].key, CRASHED, "the launch exited 0 without writing this row",
                                                "setup")
                    else:
                        break
                if outcome.failed_key not in {t.key for t in remaining}:  # never retry forever: charge the first
                    outcome.failed_key = remaining[0].key
                charged = remaining if outcome.before_start else [t for t in remaining if t.key == outcome.failed_key]
                log = _keep_log(scratch, Path(out), run_id)
                for t in charged:
                    reason = outcome.reason + (f" (torchrun output: {log})" if log else "")
                    append_row(path, ShardedRow(task=t, status=outcome.status, reason=reason, phase=outcome.phase,
                                                peak_cpu_extra_bytes=outcome.peak_cpu_extra_bytes, limit_s=config.limit_s,
                                                run_id=run_id, environment=plan["environment"]).to_row())
                report()
                if outcome.before_start:
                    break
                index = next(i for i, t in enumerate(remaining) if t.key == outcome.failed_key)
                remaining = [t for t in remaining[index + 1:] if t.key not in finished]  # each launch removes >= 1
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return read_rows(path)


def _report_new(path: Path, seen: int, say: Callable[[str], None]) -> int:
    rows = read_rows(path)
    for row in rows[seen:]:
        if row.get("kind") == "sharded":
            say(describe(row))
    return len(rows)


def _keep_log(scratch: Path, out: Path, run_id: str) -> str:
    """Copy a failed launch's torchrun output under the results folder; its path ('' if none)."""
    log = scratch / "torchrun.log"
    if not log.is_file():
        return ""
    folder = out / LOGS
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{run_id}-{int(time.time() * 1000) % 10**8}.log"
    shutil.copyfile(log, target)
    return str(target)
