"""``loram-bench continuous BASE_REV``: two revisions' init cells measured in one job,
interleaved, and the regression gate's verdict (``bench.gate.rule``).

BASE_REV is checked out into a temporary git worktree; every worker imports
``loram_ref`` from the base tree or from the working tree (``bench.gate.trees``) and is
measured by the same harness. Per cell, rounds of one process per side alternate their
order (A B, B A, ...). After every cell is screened, the flagged ones are measured again
in fresh rounds and count only when confirmed.

Files in the output folder:

* ``continuous.jsonl``: one row per worker process (cell, stage, round, side, its raw
  run), appended as it finishes. A rerun with the same code on both sides (same
  ``loram_ref`` content hashes and slowdowns) reuses the rounds already there.
* ``gate.csv`` / ``gate.json``: one row per cell, its verdict and estimates.
* ``init.jsonl`` (the working tree's cells, every round merged) and ``base/init.jsonl``
  (the base's), with their tables and pyperf files (``init.pyperf.json``), rewritten
  from ``continuous.jsonl`` at the end.
* ``history.jsonl`` (or ``--history``): the working tree's cells, and a ``change`` row per
  confirmed change, which the report's trend marks.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from bench.core.environment import environment, machine_id
from bench.core.identity import identity
from bench.core.launchers import Launcher, launcher_for, worker_command
from bench.core.results import OK, append_row, export, new_run_id, replace_text, resume, timestamp
from bench.core.rows import CHANGE, GATE_ROUND
from bench.gate.config import RESOLUTION_TARGET, ContinuousConfig
from bench.gate.rule import (
    NOT_GATED,
    REGRESSIONS,
    SAME,
    UNCHANGED,
    UNMEASURABLE,
    Decision,
    GateRule,
    Pair,
    decide,
    resolution,
)
from bench.gate.trees import (
    Tree,
    checkout_root,
    fingerprint,
    head_commit,
    initializer_fingerprints,
    resolve_revision,
    run_tree_task,
    worktree,
)
from bench.initcost.history import append_history
from bench.initcost.pyperf_format import export_init
from bench.initcost.runner import predict_worker_s
from bench.initcost.schema import Measurement, ProcessRun, SchemaError, merge_runs
from bench.initcost.tasks import Task

ROUNDS_FILE = "continuous.jsonl"
GATE_STEM = "gate"
BASE_DIR = "base"
SCREEN, CONFIRM = "screen", "confirm"
BASE, NEW = "base", "new"
def side_launcher(tree: Tree, device: str) -> Launcher:
    """Forked from the fork server on CPU (the worker swaps in its tree's ``loram_ref``),
    spawned as ``python -m bench.gate.trees`` elsewhere."""
    return launcher_for(device, functools.partial(run_tree_task, tree),
                        worker_command("bench.gate.trees", tree.to_json()), ProcessRun.from_dict)


@dataclass
class CellResult:
    """A cell's runs so far, per stage and side, keyed by round index, and its failure if
    it has one. A round counts once both of its sides have finished."""

    task: Task
    runs: dict[tuple[str, str], dict[int, ProcessRun]] = field(default_factory=dict)
    failure: str = ""
    skipped: str = ""
    predicted_s: float | None = None
    unchanged: bool = False

    def complete(self, stage: str) -> list[int]:
        """The round indices of ``stage`` that both sides finished, in order."""
        return sorted(set(self.runs.get((stage, BASE), {})) & set(self.runs.get((stage, NEW), {})))

    def next_index(self, stage: str, offset: int) -> int:
        """A round index not used yet in ``stage`` (a round whose second side failed keeps its own)."""
        used = [i for side in (BASE, NEW) for i in self.runs.get((stage, side), {})]
        return max(used) + 1 if used else offset

    def pairs(self, stage: str) -> list[Pair]:
        base, new = self.runs.get((stage, BASE), {}), self.runs.get((stage, NEW), {})
        return [Pair(base[i].values_s, new[i].values_s, base[i].peak_cpu_extra_bytes or base[i].peak_gpu_allocated_bytes,
                     new[i].peak_cpu_extra_bytes or new[i].peak_gpu_allocated_bytes) for i in self.complete(stage)]

    def side_runs(self, side: str) -> list[ProcessRun]:
        """Every run of ``side`` in a complete round, screen first."""
        return [self.runs[(stage, side)][i] for stage in (SCREEN, CONFIRM) for i in self.complete(stage)]


@dataclass
class GateRun:
    """One gate run: two sides, the rounds file, and what every cell has measured."""

    config: ContinuousConfig
    base: Tree
    new: Tree
    out: Path
    progress: bool = True
    launchers: dict[str, Launcher] = field(default_factory=dict)
    run_id: str = field(default_factory=new_run_id)
    cells: dict[str, CellResult] = field(default_factory=dict)
    #: initializers that run the same code on both sides: their cells are not measured
    unchanged: frozenset[str] = frozenset()

    @property
    def rounds_path(self) -> Path:
        return self.out / ROUNDS_FILE

    @property
    def context(self) -> dict[str, Any]:
        """What makes rounds reusable on a rerun: the code on each side, the slowdowns."""
        return {"base_commit": self.base.commit, "new_commit": self.new.commit,
                "base_fingerprint": self.base.fingerprint, "new_fingerprint": self.new.fingerprint,
                "slow_down": json.dumps(self.new.slow_down, sort_keys=True)}

    def __post_init__(self) -> None:
        if not self.launchers:
            self.launchers = {BASE: side_launcher(self.base, self.config.device),
                              NEW: side_launcher(self.new, self.config.device)}

    # -- rounds ------------------------------------------------------------------------
    def load(self, tasks: list[Task]) -> int:
        """The rounds of an earlier run of the same code in this folder; returns how many."""
        ctx = self.context
        keys = {t.key: t for t in tasks}
        self.cells = {t.key: CellResult(t) for t in tasks}
        reused = 0
        for row in resume(self.rounds_path):
            if row.get("kind") != "gate_round" or row.get("task_key") not in keys:
                continue
            if any(row.get(k) != v for k, v in ctx.items()):
                continue
            if row.get("status") == OK:
                cell = self.cells[row["task_key"]]
                cell.runs.setdefault((row["stage"], row["side"]), {})[row["round"]] = ProcessRun.from_dict(row["run"])
                reused += 1
        return reused

    def _record(self, task: Task, stage: str, index: int, side: str, slot: int, status: str, run: ProcessRun | None,
                reason: str = "", phase: str = "") -> None:
        ident = identity(task)
        row = {"kind": "gate_round", "schema_version": GATE_ROUND.version, "run_id": self.run_id,
               "timestamp": timestamp(), "task_key": task.key,
               **{**ident, "options": json.dumps(ident["options"], sort_keys=True)},
               "shape": f"{task.d_out}x{task.d_in}", "stage": stage, "round": index, "side": side, "slot": slot,
               "status": status, "reason": reason[:1000], "phase": phase,
               "run": run.as_dict() if run is not None else None, **self.context}
        append_row(self.rounds_path, row)

    def measure(self, cell: CellResult, stage: str, rounds: int, offset: int, say: Callable[[str], None]) -> None:
        """Take ``stage``'s missing rounds of ``cell``: a round with an even index runs base
        first, an odd one new first (A B, B A, ...); ``offset`` is the stage's first index."""
        task = cell.task
        while len(cell.complete(stage)) < rounds and not cell.failure:
            index = cell.next_index(stage, offset)
            order = (BASE, NEW) if index % 2 == 0 else (NEW, BASE)
            for slot, side in enumerate(order):
                outcome = self.launchers[side].launch(task, self.config.kill_after_s, self.config.memory_limit_bytes)
                if outcome.status != OK:
                    reason = f"{side} ({getattr(self, side).commit[:10]}): {outcome.status}: {outcome.reason}"
                    self._record(task, stage, index, side, slot, outcome.status, None, outcome.reason, outcome.phase)
                    cell.failure = reason[:500]
                    say(f"  {task.initializer} {task.d_out}x{task.d_in}: {reason[:300]}")
                    return
                cell.runs.setdefault((stage, side), {})[index] = outcome.run
                self._record(task, stage, index, side, slot, OK, outcome.run)

    def predicted(self, task: Task) -> float | None:
        """The new side's predicted time per worker, from the cells measured so far."""
        rows = [_prediction_row(c) for c in self.cells.values() if c.complete(SCREEN)]
        return predict_worker_s(task, rows, self.run_id)

    def screen(self, tasks: list[Task]) -> None:
        bar = tqdm(tasks, desc="gate: screen", unit="cell", disable=not self.progress, dynamic_ncols=True)
        for task in bar:
            bar.set_postfix_str(f"{task.initializer} {task.d_out}x{task.d_in}")
            cell = self.cells[task.key]
            if task.initializer in self.unchanged:
                cell.unchanged = True
                continue
            if not cell.complete(SCREEN):
                cell.predicted_s = self.predicted(task)
                if cell.predicted_s is not None and cell.predicted_s > self.config.limit_s:
                    cell.skipped = f"predicted {cell.predicted_s:.1f} s per worker > --limit {self.config.limit_s:g} s"
                    continue
            self.measure(cell, SCREEN, self.config.rule.screen_rounds, 0, bar.write)

    def flagged(self) -> list[CellResult]:
        rule = self.config.rule
        return [c for c in self.cells.values() if not c.failure and not c.skipped and not c.unchanged
                and len(c.pairs(SCREEN)) >= rule.screen_rounds and decide(c.pairs(SCREEN), None, rule).screen.flagged]

    def confirm(self) -> list[CellResult]:
        cells = self.flagged()
        rule = self.config.rule
        bar = tqdm(cells, desc="gate: confirm", unit="cell", disable=not self.progress or not cells, dynamic_ncols=True)
        for cell in bar:
            bar.set_postfix_str(f"{cell.task.initializer} {cell.task.d_out}x{cell.task.d_in}")
            self.measure(cell, CONFIRM, rule.confirm_rounds, rule.screen_rounds, bar.write)
        return cells

    # -- verdicts ----------------------------------------------------------------------
    def decision_rows(self) -> list[dict[str, Any]]:
        return [decision_row(c, self.config.rule) for c in self.cells.values()]


def _prediction_row(cell: CellResult) -> dict[str, Any]:
    runs = cell.side_runs(NEW)
    values = [v for r in runs for v in r.values_s]
    firsts = [r.first_s for r in runs if r.first_s is not None]
    return {**identity(cell.task), "status": OK, "run_id": "", "median_s": statistics.median(values) if values else None,
            "first_s": statistics.median(firsts) if firsts else None}


def decision_row(cell: CellResult, rule: GateRule) -> dict[str, Any]:
    """The gate table's row of one cell: its verdict, the stage that decided it, each
    stage's ratio with its 95 % interval, medians and peak memory."""
    task = cell.task
    ident = identity(task)
    row: dict[str, Any] = {**{**ident, "options": json.dumps(ident["options"], sort_keys=True)}, "task_key": task.key,
                           "shape": f"{task.d_out}x{task.d_in}"}
    screen, confirm = cell.pairs(SCREEN), cell.pairs(CONFIRM)
    if cell.unchanged:
        return {**row, "verdict": UNCHANGED, "stage": "",
                "detail": "the same code on both sides (its module and every loram_ref module it imports): not measured"}
    if cell.skipped:
        return {**row, "verdict": NOT_GATED, "stage": "", "detail": cell.skipped, "predicted_s": cell.predicted_s}
    if cell.failure:
        return {**row, "verdict": UNMEASURABLE, "stage": "", "detail": cell.failure}
    if len(screen) < rule.screen_rounds:
        return {**row, "verdict": UNMEASURABLE, "stage": "", "detail": "interrupted before its screening rounds"}
    first = decide(screen, None, rule)
    confirmed = first.screen.flagged and len(confirm) >= rule.confirm_rounds
    decision: Decision = decide(screen, confirm, rule) if confirmed else first
    if first.screen.flagged and not confirmed:
        return {**row, **_stage_fields(decision), "verdict": UNMEASURABLE, "stage": SCREEN,
                "detail": f"flagged ({first.verdict}) but not confirmed: interrupted before its confirming rounds; "
                          + decision.detail}
    base_values = [v for r in cell.side_runs(BASE) for v in r.values_s]
    new_values = [v for r in cell.side_runs(NEW) for v in r.values_s]
    return {**row, **_stage_fields(decision), "verdict": decision.verdict,
            "stage": CONFIRM if decision.confirm is not None else SCREEN,
            "resolution": resolution([*screen, *(confirm if decision.confirm is not None else [])], rule),
            "base_median_s": statistics.median(base_values), "new_median_s": statistics.median(new_values),
            "rounds": len(screen) + (len(confirm) if decision.confirm is not None else 0), "detail": decision.detail}


def _stage_fields(decision: Decision) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, call in (("screen", decision.screen), ("confirm", decision.confirm)):
        if call is None:
            continue
        est = call.estimate
        out.update({f"{name}_ratio": est.ratio, f"{name}_low": est.low, f"{name}_high": est.high,
                    f"{name}_base_peak_bytes": call.base_peak, f"{name}_new_peak_bytes": call.new_peak})
    last = decision.confirm or decision.screen
    out["time_ratio"] = last.estimate.ratio
    out["memory_ratio"] = (last.new_peak / last.base_peak) if last.base_peak and last.new_peak is not None else None
    return out


def side_rows(run: GateRun, side: str) -> list[dict[str, Any]]:
    """One init row per cell of ``side``: every round of both stages merged (a cell with a
    failure on this side keeps its runs; one without runs is left out)."""
    tree = getattr(run, side)
    rows = []
    for cell in run.cells.values():
        runs = cell.side_runs(side)
        if not runs:
            continue
        task = replace(cell.task, processes=len(runs))
        try:
            m = merge_runs(task, runs)
        except SchemaError as exc:
            m = Measurement(task, "failed", reason=f"runs could not be merged: {exc}")
        m.run_id, m.limit_s = run.run_id, run.config.limit_s
        m.environment = {**environment(), "git_commit": tree.commit.removesuffix("+dirty"),
                         "git_dirty": tree.commit.endswith("+dirty")}
        rows.append(m.to_row())
    return rows


def write_side(rows: list[dict[str, Any]], folder: Path) -> None:
    """``folder/init.jsonl`` rewritten with ``rows``, and its tables and pyperf file."""
    folder.mkdir(parents=True, exist_ok=True)
    if rows:  # one atomic rewrite through a temporary file of its own (bench.core.results.replace_text)
        replace_text(folder / "init.jsonl", "".join(json.dumps(row, sort_keys=True, default=str) + "\n" for row in rows))
    export_init(rows, folder)


def change_rows(run: GateRun, decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history's ``change`` rows: one per confirmed change (either direction)."""
    env = environment()
    out = []
    for d in decisions:
        if d.get("stage") != CONFIRM or d["verdict"] in (UNMEASURABLE, "not confirmed"):
            continue
        out.append({"kind": "change", "schema_version": CHANGE.version, "run_id": run.run_id,
                    "timestamp": timestamp(), "task_key": d["task_key"],
                    **{k: d[k] for k in ("initializer", "d_out", "d_in", "rank", "scaling", "dtype", "device", "threads",
                                         "options", "shape", "verdict", "time_ratio", "confirm_low", "confirm_high",
                                         "memory_ratio")},
                    "git_commit": run.new.commit.removesuffix("+dirty"), "base_commit": run.base.commit,
                    "machine": machine_id(env)})
    return out


@dataclass
class GateResult:
    decisions: list[dict[str, Any]]
    base: Tree
    new: Tree
    run_id: str
    seconds: float

    @property
    def exit_code(self) -> int:
        """1: a confirmed time or memory regression; 3: a cell could not be measured on a
        side (and no regression); 0: neither."""
        verdicts = {d["verdict"] for d in self.decisions}
        if verdicts & set(REGRESSIONS):
            return 1
        return 3 if UNMEASURABLE in verdicts else 0

    def summary(self) -> str:
        """Counts per verdict, then one line per cell that is not ``same``."""
        counts: dict[str, int] = {}
        for d in self.decisions:
            counts[d["verdict"]] = counts.get(d["verdict"], 0) + 1
        lines = [f"{len(self.decisions)} cells: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))]
        resolved = [d for d in self.decisions if math.isfinite(d.get("resolution") or math.nan)]
        blind = sorted((d for d in resolved if d["resolution"] > RESOLUTION_TARGET), key=lambda d: -d["resolution"])
        if resolved:
            lines.append(f"{len(resolved) - len(blind)} of {len(resolved)} gated cells would confirm a "
                         f"{RESOLUTION_TARGET:g}x slowdown at the noise they showed"
                         + ("; not: " + ", ".join(f"{d['initializer']} {d['shape']} (x{d['resolution']:.2f})"
                                                  for d in blind) if blind else ""))
        for d in sorted(self.decisions, key=lambda d: (d["verdict"] not in REGRESSIONS, d["verdict"], d["initializer"])):
            if d["verdict"] in (SAME, UNCHANGED):
                continue
            lines.append(f"  {d['verdict']:<20} {d['initializer']:<12} {d['shape']:<12} {d['dtype']} {d['device']}  "
                         f"{d.get('detail', '')}")
        return "\n".join(lines)


def _check_out_folder(out: Path) -> None:
    if (out / "init.jsonl").exists() and not (out / ROUNDS_FILE).exists():
        raise ValueError(f"{out} already holds init results that are not a gate's (no {ROUNDS_FILE}); the gate rewrites "
                         "init.jsonl there: pick another --out")


def same_code(base_root: Path, new_root: Path, tasks: list[Task], slow_down: dict[str, float]) -> frozenset[str]:
    """The measured initializers that run the same code on both sides and carry no planted
    slowdown (``bench.gate.trees.initializer_fingerprints``); one not found on a side is changed."""
    base, new = initializer_fingerprints(base_root), initializer_fingerprints(new_root)
    names = {t.initializer for t in tasks}
    return frozenset(n for n in names if n not in slow_down and base.get(n) is not None and base.get(n) == new.get(n))


def run_continuous(config: ContinuousConfig, out: Path, *, progress: bool = True, history: Path | None = None,
                   say: Callable[[str], None] = print) -> GateResult:
    """Measure both revisions into ``out`` and decide every cell (``bench.gate.rule``)."""
    started = time.perf_counter()
    out = Path(out)
    _check_out_folder(out)
    tasks = config.tasks()
    root = checkout_root()
    base_commit = resolve_revision(root, config.base_rev)
    new_commit, dirty = head_commit(root)
    with worktree(root, base_commit) as base_root:
        base = Tree(BASE, str(base_root), base_commit, fingerprint(base_root))
        new = Tree(NEW, str(root), new_commit + ("+dirty" if dirty else ""), fingerprint(root), dict(config.slow_down))
        same = ""
        if base.fingerprint == new.fingerprint:
            same = " (identical loram_ref" + (", slowdowns planted in the working tree's)" if config.slow_down
                                              else ": an A/A comparison)")
        say(f"gate: base {base_commit[:10]} ({config.base_rev}) against the working tree {new.commit[:16]}{same}; "
            f"{len(tasks)} cells, {config.rule.screen_rounds} screening rounds, {config.rule.confirm_rounds} confirming "
            f"rounds for flagged cells, threshold {config.rule.threshold:.0%} (time), {config.rule.memory_threshold:.0%} "
            "(memory)" + (f"; planted slowdowns {config.slow_down}" if config.slow_down else ""))
        unchanged = frozenset() if config.gate_unchanged else same_code(base_root, root, tasks, config.slow_down)
        if unchanged:
            say(f"gate: {', '.join(sorted(unchanged))} run the same code on both sides: their cells are not measured "
                "(--gate-unchanged measures them)")
        run = GateRun(config, base, new, out, progress=progress, unchanged=unchanged)
        reused = run.load(tasks)
        if reused:
            say(f"resuming: {reused} worker runs of the same code already in {run.rounds_path}")
        run.screen(tasks)
        flagged = run.confirm()
        say(f"gate: {len(flagged)} cell(s) flagged by the screen and measured again")
    decisions = run.decision_rows()
    export(decisions, out, GATE_STEM)
    new_rows, base_rows = side_rows(run, NEW), side_rows(run, BASE)
    write_side(new_rows, out)
    write_side(base_rows, out / BASE_DIR)
    history = history or out / "history.jsonl"
    append_history(new_rows, history)
    for row in change_rows(run, decisions):
        append_row(history, row)
    return GateResult(decisions, base, new, run.run_id, time.perf_counter() - started)
