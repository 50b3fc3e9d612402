"""One sharded measurement (:class:`ShardedTask`) and the row it produces (:class:`ShardedRow`)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.core.results import timestamp
from bench.core.rows import SHARDED
from bench.core.shapes import ITEMSIZE

#: ``--placement`` values and the DTensor dimension each shards: by rows (``Shard(0)``) or
#: by columns (``Shard(1)``).
PLACEMENTS = {"row": 0, "col": 1}


@dataclass(frozen=True)
class ShardedTask:
    """One sharded initializer on one layer shape, world size, placement and device.

    ``repeats`` timed calls follow the first (cold) call, which is also the memory pass;
    ``check`` compares the gathered result with the single-process ``loram_ref``
    initializer on the whole weight (rank 0, after the measurements).
    """

    initializer: str
    d_out: int
    d_in: int
    world_size: int
    placement: str = "row"
    rank: int = 16
    scaling: float = 1.0
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    repeats: int = 3
    check: bool = True

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")

    @property
    def key(self) -> str:
        """Identity for resuming: what is measured (not how often)."""
        return SHARDED.identity_key(asdict(self))

    @property
    def dim(self) -> int:
        return PLACEMENTS[self.placement]

    @property
    def weight_bytes(self) -> int:
        return self.d_out * self.d_in * ITEMSIZE[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardedTask":
        return cls(**data)


def _max(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return max(present) if present else None


@dataclass
class ShardedRow:
    """What one task measured, every per-rank list in rank order (raw, nothing pooled away).

    ``values_s[i]`` is the slowest rank's time of timed call ``i`` (each call starts at a
    barrier); ``rank_values_s[k]`` rank ``k``'s own times. Peaks are those of the cold call,
    above the RSS (GPU allocation) at its entry. ``bytes_sent`` is what each rank's
    collectives sent (``loram_ref.sharded.comm``), per call. Diffs are
    ``max|got − ref| / max|ref|`` per tensor.
    """

    task: ShardedTask
    status: str
    reason: str = ""
    phase: str = ""
    first_s: float | None = None
    values_s: list[float] = field(default_factory=list)
    rank_values_s: list[list[float]] = field(default_factory=list)
    peak_cpu_extra_bytes: list[int | None] = field(default_factory=list)
    peak_rss_bytes: list[int | None] = field(default_factory=list)
    peak_gpu_allocated_bytes: list[int | None] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    collectives: dict[str, int] = field(default_factory=dict)
    local_weight_bytes: list[int] = field(default_factory=list)
    diffs: dict[str, float] = field(default_factory=dict)
    tolerance: float | None = None
    limit_s: float | None = None
    run_id: str = ""
    environment: dict[str, Any] = field(default_factory=dict)
    timestamp: str = field(default_factory=timestamp)

    def to_row(self) -> dict[str, Any]:
        t = self.task
        max_diff = max(self.diffs.values()) if self.diffs else None
        return {
            "kind": "sharded",
            "schema_version": SHARDED.version,
            "run_id": self.run_id,
            "timestamp": self.timestamp,
            "task_key": t.key,
            **t.to_dict(),
            "shape": f"{t.d_out}x{t.d_in}",
            "numel": t.d_out * t.d_in,
            "weight_bytes": t.weight_bytes,
            "status": self.status,
            "reason": self.reason,
            "phase": self.phase,
            "limit_s": self.limit_s,
            "time_s": statistics.median(self.values_s) if self.values_s else None,
            "first_s": self.first_s,
            "values_s": self.values_s,
            "rank_values_s": self.rank_values_s,
            "peak_cpu_extra_bytes": self.peak_cpu_extra_bytes,
            "max_peak_cpu_extra_bytes": _max(self.peak_cpu_extra_bytes),
            "peak_rss_bytes": self.peak_rss_bytes,
            "max_peak_rss_bytes": _max(self.peak_rss_bytes),
            "peak_gpu_allocated_bytes": self.peak_gpu_allocated_bytes,
            "max_peak_gpu_allocated_bytes": _max(self.peak_gpu_allocated_bytes),
            "bytes_sent": self.bytes_sent,
            "max_bytes_sent": _max(self.bytes_sent),
            "collectives": self.collectives,
            "local_weight_bytes": self.local_weight_bytes,
            **{f"diff_{k}": v for k, v in self.diffs.items()},
            "max_diff": max_diff,
            "tolerance": self.tolerance,
            "within_tolerance": None if max_diff is None or self.tolerance is None else bool(max_diff <= self.tolerance),
            **self.environment,
        }
