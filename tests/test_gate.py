"""The regression gate: its decision rule, its replayed error rates, planted slowdowns,
source trees, and ``continuous`` end to end on small cells (two real revisions' trees)."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.cli import main
from bench.gate.continuous import BASE, NEW, ContinuousConfig, GateRun, run_continuous, side_rows
from bench.gate.rule import (
    FASTER, MORE_MEMORY, NOT_CONFIRMED, SAME, SLOWER, GateRule, Pair, decide, estimate, resolution,
)
from bench.gate.rates import CellRounds, draw_flags, draw_indices, load_rounds, rates
from bench.gate.plant import parse_slow_down, plant, slowed
from bench.gate.trees import Tree, checkout_root, fingerprint, load_tree, resolve_revision, run_tree_task, worktree

import loram_ref

MiB = 1 << 20


def _pairs(ratios, base=1e-3, peaks=(10 * MiB, 10 * MiB)):
    return [Pair([base] * 3, [base * r] * 3, *peaks) for r in ratios]


# -- the rule ---------------------------------------------------------------------------

def test_estimate_is_the_geometric_mean_of_round_ratios_with_a_t_interval():
    est = estimate(_pairs([1.2, 1.2 * 1.1, 1.2 / 1.1]))
    assert est.ratio == pytest.approx(1.2 * (1.1 * (1 / 1.1)) ** (1 / 3))
    assert est.low < est.ratio < est.high and est.rounds == 3
    single = estimate(_pairs([1.5]))
    assert single.ratio == pytest.approx(1.5) and math.isnan(single.low)


def test_a_flag_counts_only_when_fresh_rounds_flag_it_again_in_the_same_direction():
    rule = GateRule(screen_rounds=2, confirm_rounds=3, threshold=0.10)
    assert decide(_pairs([1.3, 1.25]), _pairs([1.28, 1.31, 1.3]), rule).verdict == SLOWER
    assert decide(_pairs([1.3, 1.25]), _pairs([1.01, 0.98, 1.02]), rule).verdict == NOT_CONFIRMED
    assert decide(_pairs([1.3, 1.25]), _pairs([0.7, 0.7, 0.7]), rule).verdict == NOT_CONFIRMED  # the other way
    assert decide(_pairs([0.7, 0.75]), _pairs([0.72, 0.7, 0.71]), rule).verdict == FASTER
    assert decide(_pairs([1.05, 1.02]), _pairs([2.0, 2.0, 2.0]), rule).verdict == SAME  # the screen decides first
    assert decide(_pairs([1.3, 1.25]), None, rule).verdict == SLOWER  # unconfirmed: the screen's call, for the scheduler


def test_confirming_rounds_must_also_put_their_interval_past_the_margin():
    rule = GateRule(screen_rounds=2, confirm_rounds=3, threshold=0.10, margin=0.05)
    # the mean passes 1.10, but the rounds scatter so widely that the interval reaches below 1.05
    assert decide(_pairs([1.3, 1.25]), _pairs([1.9, 0.9, 1.05]), rule).verdict == NOT_CONFIRMED
    assert decide(_pairs([1.3, 1.25]), _pairs([1.22, 1.18, 1.2]), rule).verdict == SLOWER
    quiet, noisy = _pairs([1.0, 1.01, 0.99, 1.0]), _pairs([1.0, 1.5, 0.7, 1.2])
    assert resolution(quiet, rule) == pytest.approx(1.10)  # the threshold binds
    assert resolution(noisy, rule) > 1.3  # this cell could not confirm a 1.3x slowdown
    assert math.isnan(resolution(quiet[:1], rule))


def test_memory_growth_needs_the_threshold_and_one_mib_in_both_stages():
    rule = GateRule(2, 2, 0.10, memory_threshold=0.05)
    grown = _pairs([1.0, 1.0], peaks=(100 * MiB, 110 * MiB))
    assert decide(grown, grown, rule).verdict == MORE_MEMORY
    small = _pairs([1.0, 1.0], peaks=(4 * MiB, int(4.9 * MiB)))  # +22 %, under 1 MiB
    assert decide(small, small, rule).verdict == SAME
    both = [replace(p, new=[v * 1.5 for p_ in [p] for v in p_.new]) for p in grown]
    assert decide(both, both, rule).verdict == f"{SLOWER}, {MORE_MEMORY}"
    assert decide(grown, _pairs([1.0, 1.0], peaks=(100 * MiB, 100 * MiB)), rule).verdict == NOT_CONFIRMED


@pytest.mark.parametrize("rule", [GateRule(0, 2, 0.1), GateRule(2, 1, 0.1), GateRule(2, 2, 0.0), GateRule(2, 2, math.nan),
                                  GateRule(2, 2, 0.1, memory_threshold=-1), GateRule(2, 2, 0.1, margin=0.2),
                                  GateRule(2, 2, 0.1, margin=-0.01)])
def test_bad_rules_are_refused_with_the_flag_named(rule):
    with pytest.raises(ValueError, match="--(screen-rounds|confirm-rounds|threshold|memory-threshold|margin)"):
        rule.validate()


# -- the replay of error rates -----------------------------------------------------------

def _cell(rng, name="x", rounds=10, sigma=0.05, key=None):
    return CellRounds(key or name, name, "64x64", rng.normal(0, sigma, rounds),
                      rng.normal(50 * MiB, MiB / 4, rounds), rng.normal(50 * MiB, MiB / 4, rounds))


def test_the_array_replay_decides_exactly_as_the_gate_does():
    rng = np.random.default_rng(3)
    rule = GateRule(2, 3, 0.08, memory_threshold=0.01, margin=0.05)
    for shift in (0.0, math.log(1.3)):
        cell = _cell(rng, sigma=0.1)
        cell.new_peaks[:4] += 3 * MiB  # some draws see memory growth
        idx = draw_indices(cell.rounds, 5, 400, rng)
        flags = draw_flags(cell, rule, idx, shift)
        for d in range(len(idx)):
            pairs = [Pair([1.0], [math.exp(cell.log_ratios[i] + shift)], cell.base_peaks[i], cell.new_peaks[i])
                     for i in idx[d]]
            verdict = decide(pairs[:2], pairs[2:], rule).verdict
            assert flags["slower"][d] == (SLOWER in verdict)
            assert flags["faster"][d] == (FASTER in verdict)
            assert flags["more_memory"][d] == (MORE_MEMORY in verdict)


def test_replayed_rates_separate_noise_from_a_planted_slowdown():
    rng = np.random.default_rng(0)
    cells = [_cell(rng, name, key=f"{name}{i}") for name in ("a", "b") for i in range(4)]
    r = rates(cells, GateRule(2, 4, 0.10), factor=1.3, draws=4000)
    assert r["false_alarm"] < 0.01  # 5 % noise per round never looks like 10 % in both stages
    assert r["power"]["a"] > 0.99 and r["caught"]["b"] > 0.95 and r["clean"]["a"] > 0.99
    noisy = [_cell(rng, "n", sigma=0.5, key=f"n{i}") for i in range(8)]
    loud = rates(noisy, GateRule(2, 4, 0.10), factor=1.3, draws=4000)
    assert loud["false_alarm"] < 0.05 and loud["power"]["n"] < 0.5  # noise this large hides 1.3x, and the replay says so


def test_the_replay_refuses_a_rule_that_needs_more_rounds_than_measured():
    with pytest.raises(ValueError, match="has 4 rounds; the rule needs 6"):
        rates([_cell(np.random.default_rng(0), rounds=4)], GateRule(2, 4, 0.1), draws=100)


# -- planted slowdowns -----------------------------------------------------------------

def test_parse_slow_down_names_the_problem():
    known = loram_ref.INITIALIZERS
    assert parse_slow_down(["loram_dst=1.3"], known) == {"loram_dst": 1.3}
    for bad, match in ((["loram_dst"], "NAME=FACTOR"), (["nope=2"], "unknown initializer"), (["loram_dst=0.9"], "> 1"),
                       (["loram_dst=x"], "number"), (["loram_dst=inf"], "finite"),
                       (["loram_dst=2", "loram_dst=3"], "twice")):
        with pytest.raises(ValueError, match=match):
            parse_slow_down(bad, known)


def test_a_slowed_function_takes_factor_times_its_own_time_and_keeps_its_signature():
    import inspect

    def work(weight, rank, scaling=1.0, *, inplace=False):
        time.sleep(0.02)
        return weight * 2

    slow = slowed(work, 2.5)
    assert inspect.signature(slow) == inspect.signature(work)
    started = time.perf_counter()
    assert slow(3, 1) == 6
    assert time.perf_counter() - started >= 2.5 * 0.02


def test_plant_replaces_only_the_named_spec():
    registry = dict(loram_ref.INITIALIZERS)
    plant(registry, {"loram_dst": 1.5})
    assert registry["loram_dst"].fn.planted_factor == 1.5
    assert registry["noise_zeros"] is loram_ref.INITIALIZERS["noise_zeros"]
    with pytest.raises(ValueError, match="no such initializer"):
        plant(registry, {"missing": 2.0})


# -- source trees ------------------------------------------------------------------------

def _copy_tree(tmp_path: Path, edit: str = "") -> Path:
    """A copy of this checkout's loram_ref under ``tmp_path``, with ``edit`` appended to its ``__init__``."""
    root = tmp_path / "tree"
    shutil.copytree(Path(loram_ref.__file__).parent, root / "loram_ref", ignore=shutil.ignore_patterns("__pycache__"))
    if edit:
        with (root / "loram_ref" / "__init__.py").open("a") as fh:
            fh.write("\n" + edit + "\n")
    return root


def test_fingerprint_sees_a_changed_file_only():
    root = checkout_root()
    assert fingerprint(root) == fingerprint(root)
    assert len(fingerprint(root)) == 16


def test_resolve_revision_names_a_bad_revision():
    root = checkout_root()
    assert len(resolve_revision(root, "HEAD")) == 40
    with pytest.raises(ValueError, match="names no commit"):
        resolve_revision(root, "no-such-branch-xyz")
    with pytest.raises(ValueError, match="not a revision"):
        resolve_revision(root, "--all")


def test_a_worktree_is_checked_out_and_removed():
    root = checkout_root()
    commit = resolve_revision(root, "HEAD")
    with worktree(root, commit) as path:
        assert (path / "loram_ref" / "__init__.py").is_file()
        import subprocess

        assert subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() == commit
    assert not path.exists()


def test_run_tree_task_measures_with_the_trees_code(tmp_path):
    import sys

    from bench.initcost.tasks import Task

    root = _copy_tree(tmp_path, "INITIALIZERS.pop('gaussian')")
    task = Task("loram_dst", 64, 48, 4, values=2, min_values=1, max_fidelity_elements=0)
    saved = {k: v for k, v in sys.modules.items() if k == "loram_ref" or k.startswith("loram_ref.")}
    path = list(sys.path)
    try:
        out = run_tree_task(Tree("base", str(root)), task)
        assert out["environment"]["loram_ref_path"] == str((root / "loram_ref").resolve())
        assert "gaussian" not in sys.modules["loram_ref"].INITIALIZERS
        module = load_tree(Tree("new", str(root), slow_down={"loram_dst": 2.0}))
        assert module.INITIALIZERS["loram_dst"].fn.planted_factor == 2.0
    finally:
        for k in [k for k in sys.modules if k == "loram_ref" or k.startswith("loram_ref.")]:
            del sys.modules[k]
        sys.modules.update(saved)
        sys.path[:] = path


def test_a_spawned_tree_worker_measures_with_the_trees_code(tmp_path):
    """The CUDA path's mechanism (``python -m bench.gate.trees TREE_JSON``), run on CPU."""
    import sys

    from bench.core.launchers import SpawnLauncher
    from bench.initcost.schema import ProcessRun
    from bench.initcost.tasks import Task

    root = _copy_tree(tmp_path)
    tree = Tree("base", str(root), slow_down={"noise_zeros": 3.0})
    launcher = SpawnLauncher([sys.executable, "-m", "bench.gate.trees", tree.to_json()], ProcessRun.from_dict)
    outcome = launcher.launch(Task("noise_zeros", 64, 48, 4, values=3, min_values=3, max_fidelity_elements=0), 120)
    assert outcome.status == "ok", outcome.reason
    assert outcome.run.environment["loram_ref_path"] == str((root / "loram_ref").resolve())
    assert main(["continuous", "HEAD", "--shape", "64x64", "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--screen-rounds", "0"]) == 2


# -- continuous, end to end --------------------------------------------------------------

SMALL = dict(presets=[], shapes=[(64, 64), (96, 64)], initializers=["loram_dst", "noise_zeros"])


def test_continuous_catches_a_planted_slowdown_and_nothing_else(tmp_path):
    config = ContinuousConfig("HEAD", **SMALL, rule=GateRule(2, 4, 1.0), slow_down={"loram_dst": 4.0},
                              gate_unchanged=True)
    result = run_continuous(config, tmp_path, progress=False, say=lambda _: None)
    verdicts = {(d["initializer"], d["shape"]): d["verdict"] for d in result.decisions}
    assert verdicts[("loram_dst", "64x64")] == verdicts[("loram_dst", "96x64")] == SLOWER
    assert all(v in (SAME, NOT_CONFIRMED) for (name, _), v in verdicts.items() if name == "noise_zeros")
    assert result.exit_code == 1
    slow = [d for d in result.decisions if d["initializer"] == "loram_dst"]
    assert all(d["stage"] == "confirm" and d["confirm_ratio"] > 2.0 for d in slow)
    # the rounds interleave: per cell, base first in even rounds, new first in odd ones
    rows = [json.loads(line) for line in (tmp_path / "continuous.jsonl").read_text().splitlines()]
    first = {(r["task_key"], r["stage"], r["round"]): r["side"] for r in rows if r["slot"] == 0}
    assert all(side == (BASE if index % 2 == 0 else NEW) for (_, _, index), side in first.items())
    # both sides' files, pyperf included, and the history with its change rows
    for folder in (tmp_path, tmp_path / "base"):
        assert (folder / "init.jsonl").is_file() and (folder / "init.pyperf.json").is_file()
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    changes = [h for h in history if h["kind"] == "change"]
    assert {c["initializer"] for c in changes} >= {"loram_dst"} and all(c["time_ratio"] > 2 for c in changes
                                                                        if c["initializer"] == "loram_dst")


class _Counting:
    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def launch(self, *args):
        self.calls += 1
        return self.inner.launch(*args)


def test_a_missing_initializer_on_one_side_is_unmeasurable_and_a_rerun_reuses_rounds(tmp_path):
    from bench.gate.continuous import side_launcher

    base = Tree(BASE, str(_copy_tree(tmp_path, "INITIALIZERS.pop('loram_dst')")), "b" * 40)
    base = replace(base, fingerprint=fingerprint(base.root))
    new = Tree(NEW, str(checkout_root()), "n" * 40, fingerprint(checkout_root()))
    config = ContinuousConfig("HEAD", presets=[], shapes=[(64, 64)], initializers=["loram_dst", "noise_zeros"],
                              rule=GateRule(2, 4, 1.0))
    tasks = config.tasks()
    launchers = {s: _Counting(side_launcher(t, "cpu")) for s, t in ((BASE, base), (NEW, new))}
    run = GateRun(config, base, new, tmp_path / "out", progress=False, launchers=launchers)
    run.load(tasks)
    run.screen(tasks)
    run.confirm()
    verdicts = {d["initializer"]: d for d in run.decision_rows()}
    assert verdicts["loram_dst"]["verdict"] == "unmeasurable"
    assert "base" in verdicts["loram_dst"]["detail"] and "unknown initializer" in verdicts["loram_dst"]["detail"]
    assert verdicts["noise_zeros"]["verdict"] in (SAME, NOT_CONFIRMED)
    paths = {r["initializer"]: r["runs"][0]["environment"]["loram_ref_path"] for r in side_rows(run, BASE)}
    assert paths["noise_zeros"] == str((Path(base.root) / "loram_ref").resolve())
    calls = sum(lau.calls for lau in launchers.values())
    again = GateRun(config, base, new, tmp_path / "out", progress=False, launchers=launchers)
    assert again.load(tasks) >= 4  # noise_zeros' screening rounds, both sides
    again.screen(tasks)
    again.confirm()
    # only the failed cell is tried again: one base launch, which fails again
    assert sum(lau.calls for lau in launchers.values()) - calls == 1


class _Scripted:
    """A launcher without processes: every launch returns ``value`` seconds per call, or
    a crash on the launch numbers in ``crash_on``."""

    name = "scripted"

    def __init__(self, value: float, crash_on=()):
        self.value, self.crash_on, self.calls = value, set(crash_on), 0

    def launch(self, task, limit_s, memory_limit_bytes=None):
        from bench.core.launchers import Outcome
        from bench.initcost.schema import ProcessRun

        self.calls += 1
        if self.calls in self.crash_on:
            return Outcome("crashed", reason="killed by signal 9")
        return Outcome("ok", ProcessRun(task_key=task.key, first_s=2 * self.value, values_s=[self.value] * 3,
                                        peak_cpu_extra_bytes=8 * MiB, environment={"side": self.value}))


def test_a_round_whose_second_side_crashed_is_left_out_and_its_index_not_reused(tmp_path):
    base = Tree(BASE, "/nowhere/base", "b" * 40, "fb")
    new = Tree(NEW, "/nowhere/new", "n" * 40, "fn")
    config = ContinuousConfig("HEAD", presets=[], shapes=[(64, 64)], initializers=["noise_zeros"], rule=GateRule(3, 6))
    tasks = config.tasks()
    first = GateRun(config, base, new, tmp_path, progress=False,
                    launchers={BASE: _Scripted(1e-3), NEW: _Scripted(1.5e-3, crash_on={1})})
    first.load(tasks)
    first.screen(tasks)
    (row,) = first.decision_rows()
    assert row["verdict"] == "unmeasurable" and "new" in row["detail"] and "crashed" in row["detail"]
    again = GateRun(config, base, new, tmp_path, progress=False,
                    launchers={BASE: _Scripted(1e-3), NEW: _Scripted(1.5e-3)})
    assert again.load(tasks) == 1  # round 0's base run, whose partner crashed
    again.screen(tasks)
    again.confirm()
    cell = again.cells[tasks[0].key]
    assert cell.complete("screen") == [1, 2, 3]  # round 0 stays incomplete; the next rounds take new indices
    assert cell.complete("confirm") == [3, 4, 5, 6, 7, 8]
    (row,) = again.decision_rows()
    assert row["verdict"] == SLOWER and row["time_ratio"] == pytest.approx(1.5) and row["rounds"] == 9
    rows = [json.loads(line) for line in (tmp_path / "continuous.jsonl").read_text().splitlines()]
    firsts = {(r["stage"], r["round"]): r["side"] for r in rows if r["slot"] == 0}
    assert firsts[("screen", 1)] == NEW and firsts[("screen", 2)] == BASE and firsts[("confirm", 3)] == NEW


def test_cli_continuous_exit_codes_report_and_bad_input(tmp_path, capsys):
    out = tmp_path / "gate"
    code = main(["continuous", "HEAD", "--shape", "64x64", "--initializers", "loram_dst", "noise_zeros",
                 "--slow-down", "loram_dst=4", "--threshold", "1.0", "--confirm-rounds", "4", "--out", str(out),
                 "--no-progress"])
    text = capsys.readouterr().out
    assert code == 1 and "REGRESSION" in text and "loram_dst" in text
    page = (out / "report.html").read_text()
    assert "Comparison with the baseline" in page and "fresh rounds" in page
    assert main(["continuous", "no-such-rev-xyz", "--shape", "64x64", "--out", str(tmp_path / "x")]) == 2
    assert "names no commit" in capsys.readouterr().err
    assert main(["continuous", "HEAD", "--shape", "64x64", "--initializers", "noise_zeros", "--slow-down",
                 "loram_dst=2", "--out", str(tmp_path / "y")]) == 2
    assert "not among the measured initializers" in capsys.readouterr().err
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "init.jsonl").write_text("")
    assert main(["continuous", "HEAD", "--shape", "64x64", "--out", str(tmp_path / "z")]) == 2
    assert "pick another --out" in capsys.readouterr().err


def test_gate_error_rates_command_reads_real_rounds(tmp_path, capsys):
    config = ContinuousConfig("HEAD", presets=[], shapes=[(64, 64)], initializers=["noise_zeros", "loram_dst"],
                              rule=GateRule(4, 2, 1000.0, 1000.0), gate_unchanged=True)
    run_continuous(config, tmp_path, progress=False, say=lambda _: None)
    cells = load_rounds(tmp_path)
    assert len(cells) == 2 and all(c.rounds == 4 for c in cells)
    assert main(["gate-error-rates", str(tmp_path), "--screen-rounds", "1", "3", "--confirm-rounds", "2",
                 "--thresholds", "0.1", "0.2", "--draws", "500", "--target", "loram_dst",
                 "--out", str(tmp_path / "rates.csv")]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "rates.csv")
    assert len(table) == 2  # 2 thresholds at 1 + 2 rounds; 3 + 2 rounds need more than the 4 measured
    assert table["false_alarm_per_run"].between(0, 1).all() and "power_loram_dst" in table
    assert main(["gate-error-rates", str(tmp_path), "--factor", "0.5"]) == 2


def test_history_trend_marks_the_runs_that_confirmed_a_change():
    import pandas as pd

    from reports.figures import history_trend

    base = {"kind": "history", "initializer": "loram_dst", "shape": "64x64", "task_key": "k", "machine": "m"}
    history = pd.DataFrame([
        {**base, "run_id": "r1", "git_commit": "a" * 40, "median_s": 1e-3},
        {**base, "run_id": "r2", "git_commit": "b" * 40, "median_s": 1.3e-3},
        {**base, "initializer": "noise_zeros", "task_key": "k2", "run_id": "r2", "git_commit": "b" * 40, "median_s": 1e-4},
        {"kind": "change", "run_id": "r2", "task_key": "k", "initializer": "loram_dst", "shape": "64x64",
         "verdict": "slower", "time_ratio": 1.31, "confirm_low": 1.25, "confirm_high": 1.37,
         "git_commit": "b" * 40, "base_commit": "a" * 40},
    ])
    fig = history_trend(history)
    marks = [t for t in fig.data if t.mode == "markers"]
    assert len(marks) == 1 and list(marks[0].x) == [1] and list(marks[0].y) == [1.3e-3]
    assert marks[0].marker.symbol == "triangle-up" and "x1.310 [1.250, 1.370]" in marks[0].text[0]
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert {t.name for t in lines} == {"loram_dst", "noise_zeros"}  # change rows are not drawn as a line


# -- which initializers changed ------------------------------------------------------------

def _edited_copy(tmp_path: Path, module: str, name: str = "tree") -> Path:
    """A copy of loram_ref with one harmless line appended to ``module``."""
    root = tmp_path / name
    shutil.copytree(Path(loram_ref.__file__).parent, root / "loram_ref", ignore=shutil.ignore_patterns("__pycache__"))
    with (root / "loram_ref" / module).open("a") as fh:
        fh.write("\n_EDITED = True\n")
    return root


@pytest.mark.parametrize("module, changed", [
    ("loram.py", {"loram_dst", "loram_rorth"}),              # one method's module: its initializers only
    ("noise.py", {"noise_zeros", "gaussian"}),
    ("bases.py", {"loram_dst", "loram_rorth"}),              # a module only LoRAM imports
    # the randomized SVD's users (fidelity included), and what imports PiSSA's helpers (the minor triplets)
    ("linalg.py", {"pissa", "pissa_rsvd", "pissa_krylov", "lora_sb", "lora_da", "lora_ga", "lora_one", "milora", "mica"}),
    ("krylov.py", {"pissa", "pissa_rsvd", "pissa_krylov", "milora", "mica"}),  # imported by PiSSA's module
    ("residual.py", {"pissa", "pissa_rsvd", "pissa_krylov", "milora", "mica", "olora", "corda", "lora_ga"}),
    ("stream.py", set(loram_ref.INITIALIZERS)),              # imported by validation, so by every method
    ("validation.py", set(loram_ref.INITIALIZERS)),          # imported by every method
    ("__init__.py", set(loram_ref.INITIALIZERS)),            # the package itself
])
def test_an_edit_changes_the_fingerprints_of_exactly_the_initializers_that_import_it(tmp_path, module, changed):
    from bench.gate.trees import initializer_fingerprints

    before = initializer_fingerprints(checkout_root())
    after = initializer_fingerprints(_edited_copy(tmp_path, module))
    assert set(before) == set(after) == set(loram_ref.INITIALIZERS)
    assert {n for n in before if before[n] != after[n]} == changed


def test_the_gate_measures_only_initializers_whose_code_changed(tmp_path):
    from bench.gate.continuous import same_code

    config = ContinuousConfig("HEAD", presets=[], shapes=[(64, 64)], initializers=["loram_dst", "noise_zeros"])
    tasks = config.tasks()
    edited = _edited_copy(tmp_path, "noise.py")
    assert same_code(checkout_root(), edited, tasks, {}) == {"loram_dst"}
    assert same_code(checkout_root(), checkout_root(), tasks, {"loram_dst": 2.0}) == {"noise_zeros"}  # planted: changed
    missing = _copy_tree(tmp_path / "m", "")
    (missing / "loram_ref" / "loram.py").write_text((missing / "loram_ref" / "loram.py").read_text()
                                                   .replace('"loram_dst"', '"loram_dst_renamed"'))
    assert "loram_dst" not in same_code(checkout_root(), missing, tasks, {})  # gone on one side: gated (unmeasurable)
    # end to end: an A/A gate run measures nothing and says so; --gate-unchanged measures every cell
    result = run_continuous(config, tmp_path / "aa", progress=False, say=lambda _: None)
    assert {d["verdict"] for d in result.decisions} == {"unchanged"} and result.exit_code == 0
    assert not (tmp_path / "aa" / "continuous.jsonl").is_file() or not (tmp_path / "aa" / "continuous.jsonl").read_text()
    assert "2 cells: 2 unchanged" in result.summary()
