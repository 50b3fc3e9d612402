"""History of runs: one line per (run, cell), with commit and machine.

The report draws a trend per initializer and shape from it. It is for graphs, not for
gating: absolute times from different days on shared machines are not comparable
enough to fail a build on (gating is ``compare``'s job, on runs of the same job).
Which metrics are kept is read from the metric table (``Metric.history``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.core.environment import machine_id
from bench.core.identity import IDENTITY_FIELDS, cell_key
from bench.core.results import OK, append_row, read_rows
from bench.core.rows import HISTORY
from bench.initcost.metrics import METRICS

FIELDS = [*IDENTITY_FIELDS, *(m.name for m in METRICS if m.history), "git_commit", "git_dirty", "timestamp", "run_id"]


def append_history(rows: list[dict[str, Any]], path: Path) -> int:
    """Append the ok init rows of one run; a run already in the file is not added twice."""
    path = Path(path)
    known = {(r.get("run_id"), r.get("task_key")) for r in read_rows(path)}
    added = 0
    for row in rows:
        key = cell_key(row) if "initializer" in row else None
        if row.get("status") != OK or (row.get("run_id"), key) in known:
            continue
        entry = {k: row.get(k) for k in FIELDS}
        entry.update(kind="history", schema_version=HISTORY.version, task_key=key, shape=f"{row['d_out']}x{row['d_in']}", machine=machine_id(row))
        append_row(path, entry)
        added += 1
    return added
