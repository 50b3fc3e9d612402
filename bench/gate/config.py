"""What a gate run measures and how it decides, as data (no torch: the command line builds
its flags from these fields and ``GateRule``'s, ``bench.cli.flags``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.core.checks import check_memory_limit, check_threads
from bench.core.defaults import DEFAULT_RANK, QUICK_PRESETS
from bench.core.options import option
from bench.gate.rule import GATE_LIMIT_S, GateRule
from bench.initcost.tasks import Task

#: One process per round: a cold call, a warm-up, then up to 5 values within 1 s (at least 2), the
#: peaks of those values' calls. The fidelity diagnostic is off: it measures nothing the gate compares.
GATE_TEMPLATE = Task(initializer="", d_out=1, d_in=1, rank=DEFAULT_RANK, warmups=1, values=5, min_values=2,
                     value_budget_s=1.0, processes=1, max_fidelity_elements=0)
#: The slowdown the summary says each cell can or cannot confirm (the issue's power target).
RESOLUTION_TARGET = 1.3


@dataclass
class ContinuousConfig:
    """What a gate run measures and how it decides."""

    base_rev: str = option(cli=False, help="the revision to compare against (e.g. HEAD~1, main, a commit)")
    presets: list[str] = option(factory=lambda: list(QUICK_PRESETS), flag="--preset", append=True,
                                help="preset, config.json or model folder (repeatable; none given: the quick suite's "
                                     "presets, unless --shape is)")
    shapes: list[tuple[int, int]] = option(factory=list, flag="--shape", append=True, parse="shape", metavar="MxN",
                                           help="a layer shape to gate as well (repeatable)")
    initializers: list[str] | None = option(None, choices="initializers", help="initializers to gate (none: all; see `loram-bench list`)")
    rank: int = option(DEFAULT_RANK, help="LoRA rank r")
    dtype: str = option("float32", choices=("float32", "bfloat16", "float16"), help="the weight's dtype")
    device: str = option("cpu", help="cpu or cuda[:N]")
    threads: int = option(0, help="torch threads (0: 2 on CPU)")
    rule: GateRule = option(factory=GateRule, cli=False, help="how many rounds and when a cell is flagged (its own flags)")
    limit_s: float = option(GATE_LIMIT_S, flag="--limit",
                            help="seconds a worker may be predicted to take; slower cells are not gated (listed)")
    slow_down: dict[str, float] = option(factory=dict, cli=False,
                                         help="self-test: initializers made slower by a factor (--slow-down NAME=FACTOR)")
    memory_limit_bytes: int | None = option(None, flag="--memory-limit", parse="size", metavar="SIZE",
                                            help="cap each worker's extra memory")
    gate_unchanged: bool = option(False, help="also measure initializers whose code is the same on both sides (an "
                                              "A/A study; by default their cells are listed as unchanged and not "
                                              "measured)")

    @property
    def kill_after_s(self) -> float:
        """A worker is killed after this long: well past the prediction limit, so a cell
        predicted just under it is measured, and a hung one still ends."""
        return max(60.0, 3 * self.limit_s)

    def tasks(self) -> list[Task]:
        """The cells, smallest first (cost laws exist before the large shapes come up)."""
        self.rule.validate()
        if not (isinstance(self.limit_s, (int, float)) and math.isfinite(self.limit_s) and self.limit_s > 0):
            raise ValueError(f"--limit must be a finite number of seconds > 0, got {self.limit_s!r}")
        if not self.presets and not self.shapes:
            raise ValueError("continuous needs --preset or --shape (default: the quick suite's presets)")
        check_threads(self.threads, device="cpu" if self.device == "cpu" else "cuda")
        check_memory_limit(self.memory_limit_bytes)
        from bench.initcost.suite import init_tasks

        threads = self.threads or _default_threads(self.device)
        tasks = init_tasks(self.presets, self.initializers, rank=self.rank, dtype=self.dtype, device=self.device,
                           threads=threads, template=GATE_TEMPLATE, extra_shapes=self.shapes)
        names = {t.initializer for t in tasks}
        for name in self.slow_down:
            if name not in names:
                raise ValueError(f"--slow-down {name}: {name} is not among the measured initializers")
        return sorted(tasks, key=lambda t: (t.d_out * t.d_in, t.d_out, t.initializer))




def _default_threads(device: str) -> int:
    import torch

    return min(2, torch.get_num_threads()) if device == "cpu" else 1
