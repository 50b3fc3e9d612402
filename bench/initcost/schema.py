"""The result schema: one measured cell, its per-process runs, its environment.

pyperf's Run/Benchmark split: a :class:`ProcessRun` is what one worker process measured
(raw values and peaks, nothing derived); a :class:`Measurement` is one cell (its task,
status, runs and the manager's environment). Statistics are derived from the runs in one
place (:func:`bench.initcost.metrics.derive`). Merging refuses runs of another cell or of another
environment.

Every row written carries ``schema_version``. Rows without one were written by the first
release (schema 1: per-process fields merged into the row); :func:`upgrade_row` turns
them into the current schema, so old results folders still load.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from bench.core import rows
from bench.core.identity import cell_key, parse_options
from bench.core.results import timestamp
from bench.core.rows import OK, SKIPPED
from bench.initcost.metrics import derive
from bench.initcost.tasks import Task

#: The init row's version (``bench.core.rows.INIT``).
SCHEMA_VERSION = rows.INIT.version



class SchemaError(ValueError):
    """A row or a merge that does not fit the schema."""


@dataclass
class ProcessRun:
    """What one worker process measured for one cell: raw, nothing derived.

    ``values_s`` are the steady-state wall times after ``warmups`` calls; ``first_s`` the
    first (cold) call; ``event_values_s`` the CUDA-event times of the same calls (CUDA
    only); the peaks are the largest over the timed calls (each a memory region of its
    own). ``environment`` is the worker's own (threads, versions, where ``loram_ref`` was
    imported from): runs merge into one cell only when it is identical.
    """

    task_key: str = ""
    first_s: float | None = None
    first_event_s: float | None = None
    values_s: list[float] = field(default_factory=list)
    event_values_s: list[float] = field(default_factory=list)
    warmups: int = 0
    peak_cpu_extra_bytes: int | None = None
    peak_rss_bytes: int | None = None
    peak_gpu_allocated_bytes: int | None = None
    peak_gpu_reserved_bytes: int | None = None
    reconstruction_rel_err: float | None = None
    delta_rel_norm: float | None = None
    init_info: str = "{}"
    #: the harness's step-0 diagnostics could not be computed (the timings still stand)
    diagnostics_error: str = ""
    #: the initializer's fidelity diagnostic (``loram_ref.fidelity``), first process only
    fidelity: dict[str, float] = field(default_factory=dict)
    worker_wall_s: float | None = None
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda_event_gap(self) -> float | None:
        """Largest ``|event − wall| / wall`` over this process's timed calls (CUDA only)."""
        pairs = list(zip(self.values_s, self.event_values_s))
        if self.first_s and self.first_event_s is not None:
            pairs.append((self.first_s, self.first_event_s))
        gaps = [abs(e - w) / w for w, e in pairs if w > 0]
        return max(gaps) if gaps else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cuda_event_gap": self.cuda_event_gap}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProcessRun":
        """Known fields only: derived statistics a worker may have sent are not trusted."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _distinct(values: list[str]) -> str:
    unique = list(dict.fromkeys(values))
    return unique[0] if len(unique) == 1 else json.dumps(unique)


@dataclass
class Measurement:
    """One cell: a task, its status, the runs of its worker processes, the environment."""

    task: Task
    status: str
    reason: str = ""
    runs: list[ProcessRun] = field(default_factory=list)
    predicted_s: float | None = None
    #: the time limit the cell ran (or was skipped) under; a larger limit retries a skip
    limit_s: float | None = None
    #: where a failure happened: "setup", "initializer" or "diagnostics" (the harness's own)
    phase: str = ""
    #: the cell's hardware floor (``bench.initcost.calibrate``) and the calibration it came from
    floor_s: float | None = None
    calibration: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    timestamp: str = field(default_factory=timestamp)
    environment: dict[str, Any] = field(default_factory=dict)
    upgraded_from: int | None = None
    #: schema-1 facts the runs cannot rebuild (its processes were merged before writing)
    legacy: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return cell_key(self.task)

    def stats(self) -> dict[str, Any]:
        """Every derived statistic of the cell (empty lists and ``None`` without runs)."""
        out = derive([r.as_dict() for r in self.runs])
        out["first_values_s"] = [r.first_s for r in self.runs]
        out.update(self.legacy)
        return out

    def to_row(self) -> dict[str, Any]:
        """The flat row written to ``init.jsonl``: identity, status, derived statistics,
        the raw runs, and the environment, with the schema version."""
        task = self.task.to_dict()
        task["options"] = json.dumps(task["options"], sort_keys=True)
        worker_env = self.runs[0].environment if self.runs else {}
        stats = self.stats() if self.runs else {}
        row = {
            "kind": "init",
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "timestamp": self.timestamp,
            "task_key": self.key,
            **task,
            "status": self.status,
            "reason": self.reason,
            "predicted_s": self.predicted_s,
            "limit_s": self.limit_s,
            "phase": self.phase,
            "weight_bytes": self.task.d_out * self.task.d_in * self.task.itemsize,
            **stats,
            "floor_s": self.floor_s,
            "floor_ratio": (stats["median_s"] / self.floor_s) if self.floor_s and stats.get("median_s") else None,
            **self.calibration,
            "init_info": _distinct([r.init_info for r in self.runs]) if self.runs else "",
            **{f"fidelity_{k}": v for r in self.runs[:1] for k, v in r.fidelity.items()},
            "torch_threads": worker_env.get("torch_threads"),
            "cpu_peak_method": worker_env.get("cpu_peak_method", ""),
            "runs": [asdict(r) for r in self.runs],
            **self.environment,
        }
        if self.upgraded_from is not None:
            row["upgraded_from"] = self.upgraded_from
        if self.legacy:
            row["legacy"] = self.legacy
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Measurement":
        """Rebuild a measurement from a row of any schema version."""
        row = upgrade_row(row)
        task = task_from_row(row)
        runs = [ProcessRun.from_dict(r) for r in row.get("runs") or []]
        env = {k: v for k, v in row.items() if k in _ENVIRONMENT_FIELDS}
        return cls(task=task, status=row.get("status", ""), reason=row.get("reason") or "", runs=runs,
                   predicted_s=row.get("predicted_s"), limit_s=row.get("limit_s"), phase=row.get("phase") or "",
                   floor_s=row.get("floor_s"), calibration={k: v for k, v in row.items() if k.startswith("calib_")},
                   run_id=row.get("run_id", ""), timestamp=row.get("timestamp", ""),
                   environment=env, upgraded_from=row.get("upgraded_from"), legacy=row.get("legacy") or {})


def merge_runs(task: Task, runs: list[ProcessRun], **fields_: Any) -> Measurement:
    """One ok cell from the runs of its worker processes.

    Raises :class:`SchemaError` when a run measured another cell (its ``task_key``) or
    ran in another environment than the first: pooling them would mix two experiments.
    """
    if not runs:
        raise SchemaError("merge_runs needs at least one run")
    key = cell_key(task)
    for i, run in enumerate(runs):
        if run.task_key and run.task_key != key:
            raise SchemaError(f"run {i} measured cell {run.task_key}, not {key} ({task.initializer} {task.d_out}x{task.d_in})")
        if run.environment != runs[0].environment:
            diff = sorted(k for k in set(run.environment) | set(runs[0].environment)
                          if run.environment.get(k) != runs[0].environment.get(k))
            raise SchemaError(f"run {i} ran in another environment than run 0 (differs in {', '.join(diff)})")
    return Measurement(task=task, status=OK, runs=list(runs), **fields_)


_TASK_FIELDS = {f.name for f in fields(Task)}
#: The manager's environment fields (``bench.core.environment.environment()``).
_ENVIRONMENT_FIELDS = {
    "git_commit", "git_dirty", "hostname", "platform", "python", "cpu_model", "cpu_count", "memory_bytes",
    "gpu_name", "gpu_memory_bytes", "cuda_version", "torch_version", "transformers_version", "peft_version",
    "numpy_version", "pandas_version", "scipy_version", "plotly_version",
}


def task_from_row(row: dict[str, Any]) -> Task:
    """The task of a row; fields a hand-made or old row lacks take the task defaults."""
    data = {k: v for k, v in row.items() if k in _TASK_FIELDS}
    data["options"] = parse_options(row.get("options"))
    for name in ("scaling", "threads"):
        if data.get(name) is None:
            data.pop(name, None)
    return Task(**data)


#: Schema-1 init fields that belong to one worker process.
_V1_RUN_FIELDS = ("first_s", "first_event_s", "values_s", "event_values_s", "warmups", "peak_cpu_extra_bytes",
                  "peak_rss_bytes", "peak_gpu_allocated_bytes", "peak_gpu_reserved_bytes", "reconstruction_rel_err",
                  "delta_rel_norm", "init_info", "worker_wall_s")


def upgrade_init_v1(row: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 wrote one flat row per cell, its processes already merged (values pooled,
    peaks maxed, every other field the first process's). The pooled values become one
    run; the process count and per-process cold calls are kept as ``legacy``."""
    out = dict(row)
    if row.get("status") == OK:
        run = {k: row[k] for k in _V1_RUN_FIELDS if row.get(k) is not None}
        run["environment"] = {k: row[k] for k in ("torch_threads", "cpu_peak_method") if row.get(k) is not None}
        run["task_key"] = row.get("task_key", "")
        out["runs"] = [run]
        if (row.get("processes") or 1) > 1:
            out["legacy"] = {"processes": row["processes"], "first_values_s": row.get("first_values_s") or []}
    else:
        out["runs"] = []
        limit = re.search(r"> limit (\d+(?:\.\d+)?) s", row.get("reason") or "")
        if row.get("status") == SKIPPED and limit:  # the limit a schema-1 skip was predicted against
            out["limit_s"] = float(limit.group(1))
    out["upgraded_from"] = 1
    out["schema_version"] = SCHEMA_VERSION
    return out


def upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row of any known schema version in the current one, without the init rebuild (a
    new dict when anything changed; the input is kept)."""
    spec = rows.spec_of(row)
    try:
        return row if spec is None else spec.upgrade(row, normalize=False)
    except rows.RowVersionError as exc:
        raise SchemaError(str(exc)) from None


def rebuild_init_row(row: dict[str, Any]) -> dict[str, Any]:
    """An upgraded init row rebuilt from its runs, so every statistic is derived the one way
    (``bench.initcost.metrics.derive``); fields the schema does not list are kept."""
    extra = {k: v for k, v in row.items() if k not in _INIT_ROW_FIELDS}
    return {**extra, **Measurement.from_row(row).to_row()}


def normalize_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the current code writes it: init rows rebuilt from their runs, other kinds
    upgraded (``bench.core.rows.upgrade``)."""
    try:
        return rows.upgrade(row)
    except rows.RowVersionError as exc:
        raise SchemaError(str(exc)) from None


_INIT_ROW_FIELDS = _TASK_FIELDS | _ENVIRONMENT_FIELDS | {"runs", "legacy"}
