"""History of runs: one line per (run, initializer, shape), with commit and machine.

The report draws a trend per initializer and shape from it. It is for graphs, not for
gating: absolute times from different days on shared machines are not comparable
enough to fail a build on (gating is ``compare``'s job, on runs of the same job).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .environment import machine_id
from .results import OK, append_row, read_rows

FIELDS = ["initializer", "d_out", "d_in", "rank", "dtype", "device", "threads", "median_s", "first_s",
          "peak_cpu_extra_bytes", "peak_gpu_allocated_bytes", "git_commit", "git_dirty", "timestamp", "run_id"]


def append_history(rows: list[dict[str, Any]], path: Path) -> int:
    """Append the ok init rows of one run; a run already in the file is not added twice."""
    path = Path(path)
    known = {(r.get("run_id"), r.get("task_key")) for r in read_rows(path)}
    added = 0
    for row in rows:
        if row.get("status") != OK or (row.get("run_id"), row.get("task_key")) in known:
            continue
        entry = {k: row.get(k) for k in FIELDS}
        entry.update(task_key=row.get("task_key"), shape=f"{row['d_out']}x{row['d_in']}", machine=machine_id(row))
        append_row(path, entry)
        added += 1
    return added
