"""What one measurement is: an initializer on one layer shape, rank, dtype and device."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bench.core.identity import cell_key
from bench.core.shapes import ITEMSIZE


@dataclass(frozen=True)
class Task:
    """One init-cost measurement, run in its own worker process.

    ``warmups`` calls follow the first (cold) call; then up to ``values`` timed calls, or
    fewer once ``value_budget_s`` of timed work is spent (never fewer than ``min_values``).
    Up to ``processes`` workers each contribute values, while their total wall time stays
    under ``2 · value_budget_s``: values of one process share its state (allocator,
    caches, frequency), so the spread between processes must be in the sample (pyperf's
    lesson) for a comparison's test to mean anything.
    """

    initializer: str
    d_out: int
    d_in: int
    rank: int
    role: str = ""
    count: int = 1
    preset: str = ""
    scaling: float = 1.0
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 2
    seed: int = 0
    #: the weight's spectrum (``bench.core.weights``): flat (i.i.d. Gaussian entries), or spiked
    #: (a decaying top above the bulk, the layer task's W)
    spectrum: str = "flat"
    warmups: int = 1
    values: int = 5
    min_values: int = 2
    value_budget_s: float = 10.0
    processes: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    #: run the initializer's fidelity diagnostic (``InitializerSpec.fidelity``) on cells up
    #: to this many elements (0: never); the runner asks only the first process of a cell
    max_fidelity_elements: int = 4096 * 4096

    @property
    def key(self) -> str:
        """Identity for resuming and matching: what is measured, not how many times
        (``bench.core.identity.cell_key``)."""
        return cell_key(self)

    @property
    def itemsize(self) -> int:
        """Bytes per element of the weight's dtype."""
        return ITEMSIZE[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Task":
        return cls(**data)
