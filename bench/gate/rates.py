"""The regression gate's error rates, measured by replaying real A/A rounds
(``loram-bench gate-error-rates ROUNDS...``).

Input: ``continuous.jsonl`` files of A/A gate runs that took many rounds per cell (e.g.
``continuous HEAD --screen-rounds 10 --threshold 1000``: both sides the same code). A
simulated gate run draws, for every cell, ``screen_rounds + confirm_rounds`` distinct
rounds of that cell without replacement; the first ones screen, the rest confirm, and
the rule of ``bench.gate.rule`` decides. Whole rounds are drawn, never single values, so what
one round shares (the two processes back to back, the machine's state of that moment)
stays together; rounds of one cell drawn for both stages were measured close in time,
which makes the replay's confirmations, if anything, easier to fool than the real
gate's (whose confirming rounds come after every other cell).

* False alarms: a cell's false-alarm probability is the share of draws in which the gate
  confirms a time or memory regression; the per-run rate is ``1 − Π (1 − p_cell)`` over
  the cells of one file (cells are drawn independently).
* Power: the new side of one initializer's cells is made ``factor`` times slower (its
  round log ratios shifted by ``log factor``: what ``--slow-down`` plants, a busy-wait
  that scales the call time exactly); a run *detects* it when at least one of those cells
  is confirmed slower, and is *clean* when no other cell is flagged.

The replay works on arrays for speed; a test checks it against ``bench.gate.rule.decide``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.core.intervals import t_half_width
from bench.core.results import OK, read_rows
from bench.gate.rule import MEMORY_FLOOR_BYTES, GateRule


@dataclass
class CellRounds:
    """One cell's rounds: log time ratio (new/base) and each side's peak memory per round."""

    task_key: str
    initializer: str
    shape: str
    log_ratios: np.ndarray
    base_peaks: np.ndarray
    new_peaks: np.ndarray

    @property
    def rounds(self) -> int:
        return len(self.log_ratios)


def _peak(run: dict[str, Any]) -> float:
    value = run.get("peak_cpu_extra_bytes") or run.get("peak_gpu_allocated_bytes")
    return float(value) if value is not None else math.nan


def load_rounds(path: Path) -> list[CellRounds]:
    """Every cell's complete rounds (both sides ok) from one ``continuous.jsonl``, in order."""
    path = Path(path)
    file = path / "continuous.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no gate rounds at {file} (run `loram-bench continuous` first)")
    sides: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    names: dict[str, tuple[str, str]] = {}
    for row in read_rows(file):
        if row.get("kind") != "gate_round" or row.get("status") != OK or not row.get("run"):
            continue
        sides.setdefault((row["task_key"], row["stage"], row["round"]), {})[row["side"]] = row["run"]
        names[row["task_key"]] = (row["initializer"], row["shape"])
    cells: dict[str, list[tuple[float, float, float]]] = {}
    for (key, stage, index), pair in sorted(sides.items(), key=lambda kv: (kv[0][0], kv[0][1] != "screen", kv[0][2])):
        if set(pair) != {"base", "new"}:
            continue
        base, new = pair["base"], pair["new"]
        log_ratio = math.log(statistics.median(new["values_s"])) - math.log(statistics.median(base["values_s"]))
        cells.setdefault(key, []).append((log_ratio, _peak(base), _peak(new)))
    if not cells:
        raise ValueError(f"{file} holds no complete gate rounds")
    return [CellRounds(key, *names[key], *map(np.array, zip(*rounds))) for key, rounds in cells.items()]


def _memory_flags(base: np.ndarray, new: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(grew, shrank) per draw from the medians of each side's peaks (NaN-free rows only)."""
    b, n = np.median(base, axis=1), np.median(new, axis=1)
    known = np.isfinite(b) & np.isfinite(n)
    margin = np.maximum(MEMORY_FLOOR_BYTES, threshold * np.where(known, b, 0))
    return known & (n - b > margin), known & (b - n > margin)


def draw_indices(rounds: int, need: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``draws`` rows of ``need`` distinct round indices out of ``rounds``."""
    return np.argsort(rng.random((draws, rounds)), axis=1)[:, :need]


def draw_flags(cell: CellRounds, rule: GateRule, idx: np.ndarray, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Per draw (a row of ``idx``: screening rounds, then confirming rounds), whether the
    gate confirms the cell slower, faster, with more or with less memory, its log ratios
    shifted by ``shift`` (``log factor`` for a planted slowdown). ``bench.gate.rule.decide``'s
    rule, on arrays."""
    s, c = idx[:, :rule.screen_rounds], idx[:, rule.screen_rounds:]
    logs = cell.log_ratios + shift
    limit, margin = math.log1p(rule.threshold), math.log1p(rule.margin)
    screen_mean, confirm_mean = logs[s].mean(axis=1), logs[c].mean(axis=1)
    half = t_half_width(logs[c].std(axis=1, ddof=1), c.shape[1])
    s_grew, s_shrank = _memory_flags(cell.base_peaks[s], cell.new_peaks[s], rule.memory_threshold)
    c_grew, c_shrank = _memory_flags(cell.base_peaks[c], cell.new_peaks[c], rule.memory_threshold)
    return {"slower": (screen_mean > limit) & (confirm_mean > limit) & (confirm_mean - half > margin),
            "faster": (screen_mean < -limit) & (confirm_mean < -limit) & (confirm_mean + half < -margin),
            "more_memory": s_grew & c_grew, "less_memory": s_shrank & c_shrank}


def cell_rates(cell: CellRounds, rule: GateRule, draws: int, rng: np.random.Generator,
               shift: float = 0.0) -> dict[str, float]:
    """Share of simulated gate runs in which this cell is confirmed slower, confirmed with
    more memory, as a regression (either), or flagged at all (any confirmed verdict)."""
    need = rule.screen_rounds + rule.confirm_rounds
    if cell.rounds < need:
        raise ValueError(f"{cell.initializer} {cell.shape} has {cell.rounds} rounds; the rule needs {need} "
                         f"({rule.screen_rounds} screening + {rule.confirm_rounds} confirming)")
    f = draw_flags(cell, rule, draw_indices(cell.rounds, need, draws, rng), shift)
    regression = f["slower"] | f["more_memory"]
    return {"slower": float(f["slower"].mean()), "more_memory": float(f["more_memory"].mean()),
            "regression": float(regression.mean()),
            "flagged": float((regression | f["faster"] | f["less_memory"]).mean())}


def _run_rate(per_cell: list[float]) -> float:
    return 1.0 - float(np.prod([1.0 - p for p in per_cell]))


def rates(cells: list[CellRounds], rule: GateRule, factor: float = 1.3, draws: int = 20000,
          seed: int = 0) -> dict[str, Any]:
    """False-alarm rate per run, and power per initializer at a planted ``factor``.

    Returns ``false_alarm`` (P(some cell confirmed as a regression) under A/A),
    ``false_flag`` (P(some cell confirmed in either direction)), ``cell_false`` (per cell),
    and per initializer ``power`` (P(>= 1 of its cells confirmed slower)), ``caught``
    (expected share of its cells confirmed slower) and ``clean`` (P(no other cell flagged)).
    """
    rng = np.random.default_rng(seed)
    null = {c.task_key: cell_rates(c, rule, draws, rng) for c in cells}
    out: dict[str, Any] = {
        "false_alarm": _run_rate([r["regression"] for r in null.values()]),
        "false_flag": _run_rate([r["flagged"] for r in null.values()]),
        "cell_false": {c.task_key: null[c.task_key]["regression"] for c in cells},
        "power": {}, "caught": {}, "clean": {},
    }
    shift = math.log(factor)
    for name in sorted({c.initializer for c in cells}):
        mine = [c for c in cells if c.initializer == name]
        hit = [cell_rates(c, rule, draws, rng, shift)["slower"] for c in mine]
        out["power"][name] = _run_rate(hit)
        out["caught"][name] = float(np.mean(hit))
        out["clean"][name] = 1.0 - _run_rate([null[c.task_key]["flagged"] for c in cells if c.initializer != name])
    return out


def rate_table(files: list[Path], rules: list[GateRule], factor: float, draws: int = 20000,
               target: str | None = None) -> pd.DataFrame:
    """One row per (file, rule): cells, false-alarm rate per run, and power at ``factor``
    (the weakest initializer's, and ``target``'s when named)."""
    rows = []
    for file in files:
        cells = load_rounds(file)
        fewest = min(c.rounds for c in cells)
        for rule in rules:
            if rule.screen_rounds + rule.confirm_rounds > fewest:
                continue
            r = rates(cells, rule, factor, draws)
            weakest = min(r["power"], key=r["power"].get)
            row = {"file": str(file), "cells": len(cells), "rounds_available": fewest,
                   "screen_rounds": rule.screen_rounds, "confirm_rounds": rule.confirm_rounds,
                   "threshold": rule.threshold, "margin": rule.margin, "false_alarm_per_run": r["false_alarm"],
                   "false_flag_per_run": r["false_flag"], "power_min": r["power"][weakest], "power_min_initializer": weakest,
                   "caught_min": min(r["caught"].values()), "clean_min": min(r["clean"].values())}
            if target:
                if target not in r["power"]:
                    raise ValueError(f"--target {target}: no cell of it in {file}")
                row.update({f"power_{target}": r["power"][target], f"caught_{target}": r["caught"][target],
                            f"clean_{target}": r["clean"][target]})
            rows.append(row)
    return pd.DataFrame(rows)
