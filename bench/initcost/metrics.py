"""The one table of metrics: what each is, its unit, how several worker processes merge
into one cell, and how a change in it gates a regression.

``compare``, the history and the report's columns read :data:`METRICS`; the runner's
merge derives every cell statistic through :func:`derive`, and nowhere else.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable

#: Verdicts of a comparison of two measurements of a cell (``compare``, the gate). Memory
#: changes below this many bytes are never called.
MEMORY_FLOOR_BYTES = 1 << 20
SLOWER, FASTER, SAME = "slower", "faster", "same"
MORE_MEMORY, LESS_MEMORY = "more memory", "less memory"
NOT_CONFIRMED, UNMEASURABLE, NOT_GATED = "not confirmed", "unmeasurable", "not gated"
#: A cell whose initializer runs the same code on both sides (``bench.gate.trees.initializer_fingerprints``):
#: not measured, nothing to gate.
UNCHANGED = "unchanged"
#: verdicts that fail the gate (exit 1)
REGRESSIONS = (SLOWER, MORE_MEMORY, f"{SLOWER}, {MORE_MEMORY}")


class Merge(str, Enum):
    """How the values of several worker processes of one cell become the cell's value."""

    POOL = "pool"  # raw values of every process together form one sample (median, mean, stdev over it)
    MAX = "max"  # the largest process value (peaks)
    MEDIAN = "median"  # the median over processes (one value per process, e.g. the cold call)
    SUM = "sum"  # added up (wall time spent)


class Gate(str, Enum):
    """How ``compare`` decides that a change of the metric is a regression."""

    NONE = "none"  # reported, never gated
    TEST = "test"  # ratio of medians beyond the time threshold and a significant rank test on the raw values
    THRESHOLD = "threshold"  # relative growth beyond the memory threshold and above an absolute floor


@dataclass(frozen=True)
class Metric:
    """One measured quantity of an init cell.

    Attributes:
        name: its column in a result row (for POOL, the median's column).
        label: what a reader is told it is.
        unit: ``s``, ``bytes`` or ``ratio``.
        merge: how processes merge (:class:`Merge`).
        gate: how a regression is decided (:class:`Gate`).
        source: the per-process field it is derived from (POOL: a list of raw values).
        history: kept in ``history.jsonl`` for the trend.
    """

    name: str
    label: str
    unit: str
    merge: Merge
    gate: Gate = Gate.NONE
    source: str = ""
    history: bool = False

    @property
    def field(self) -> str:
        return self.source or self.name


TIME = Metric("median_s", "init time (median of the steady-state values)", "s", Merge.POOL, Gate.TEST,
              source="values_s", history=True)
METRICS: tuple[Metric, ...] = (
    TIME,
    Metric("first_s", "first (cold) call, median over processes", "s", Merge.MEDIAN, history=True),
    Metric("peak_cpu_extra_bytes", "CPU peak RSS above entry", "bytes", Merge.MAX, Gate.THRESHOLD, history=True),
    Metric("peak_gpu_allocated_bytes", "GPU peak allocated above entry", "bytes", Merge.MAX, Gate.THRESHOLD, history=True),
    Metric("peak_gpu_reserved_bytes", "GPU peak reserved above entry", "bytes", Merge.MAX),
    Metric("peak_rss_bytes", "peak RSS of the worker during the init call", "bytes", Merge.MAX),
    Metric("cuda_event_gap", "largest |CUDA event time − wall time| / wall time", "ratio", Merge.MAX),
    Metric("reconstruction_rel_err", "‖W_res + s·B·A − W‖_F / ‖W‖_F at step 0", "ratio", Merge.MAX),
    Metric("delta_rel_norm", "‖s·B·A‖_F / ‖W‖_F at step 0", "ratio", Merge.MAX),
    Metric("worker_wall_s", "wall time of the worker processes", "s", Merge.SUM),
)
BY_NAME = {m.name: m for m in METRICS}


def gated(gate: Gate) -> list[Metric]:
    return [m for m in METRICS if m.gate is gate]


def _values(runs: Iterable[dict[str, Any]], name: str) -> list[float]:
    return [r[name] for r in runs if r.get(name) is not None]


def derive(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every cell statistic from its processes' raw fields (``ProcessRun.as_dict()`` each).

    A POOL metric also yields its raw sample (``values_s``), its mean and its sample
    standard deviation; a metric no process reported is ``None``.
    """
    out: dict[str, Any] = {"processes": len(runs)}
    for m in METRICS:
        if m.merge is Merge.POOL:
            pooled = [v for r in runs for v in (r.get(m.field) or [])]
            out[m.field] = pooled
            out[m.name] = statistics.median(pooled) if pooled else None
            stem = m.name.removeprefix("median_")
            out[f"mean_{stem}"] = statistics.fmean(pooled) if pooled else None
            out[f"stdev_{stem}"] = statistics.stdev(pooled) if len(pooled) > 1 else 0.0
            continue
        values = _values(runs, m.field)
        if not values:
            out[m.name] = None
        elif m.merge is Merge.MAX:
            out[m.name] = max(values)
        elif m.merge is Merge.MEDIAN:
            out[m.name] = statistics.median(values)
        else:
            out[m.name] = sum(values)
    return out
