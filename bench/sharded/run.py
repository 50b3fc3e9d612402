"""The sharded suite: tasks from a config, launched one world size at a time, resumed, and
relaunched past a failure, every outcome a row of ``sharded.jsonl``."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.core.environment import environment
from bench.core.results import append_row, done_keys, new_run_id, read_rows, resume
from bench.core.rows import CRASHED, OK, SHARDED
from bench.sharded.config import ShardedConfig
from bench.sharded.launch import LaunchOutcome, ShardedLauncher
from bench.sharded.tasks import ShardedRow, ShardedTask

RESULTS_FILE = "sharded.jsonl"
#: Failed launches keep their torchrun output here, under the results folder.
LOGS = "sharded-logs"


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
