"""compare: statistics, thresholds, exit codes; history."""

from __future__ import annotations

import json
import random

import pytest

from bench.cli import main
from bench.initcost.compare import EXIT_OK, EXIT_REGRESSION, EXIT_UNMEASURABLE, Thresholds, compare_cell, min_reachable_p
from bench.initcost.history import append_history
from bench.core.results import append_row, read_rows


def _row(values, status="ok", key="k1", mem=10 << 20, **extra):
    # cells are told apart by their identity (bench.core.identity); ``key`` names one through its options
    return {"kind": "init", "task_key": key, "initializer": "pissa", "d_out": 64, "d_in": 32, "rank": 4, "dtype": "float32",
            "device": "cpu", "threads": 2, "options": json.dumps({"cell": key}), "status": status, "values_s": values,
            "median_s": sorted(values)[len(values) // 2] if values else None, "peak_cpu_extra_bytes": mem,
            "run_id": extra.pop("run_id", "r1"), "git_commit": "abc", "hostname": "h", "cpu_model": "c", "cpu_count": 2, **extra}


def _noisy(center, n=8, seed=0):
    rng = random.Random(seed)
    return [center * (1 + 0.02 * rng.uniform(-1, 1)) for _ in range(n)]


def test_min_reachable_p():
    assert min_reachable_p(3, 3) == pytest.approx(0.1)
    assert min_reachable_p(5, 5) == pytest.approx(2 / 252)


def test_clear_slowdown_is_flagged():
    cell = compare_cell(_row(_noisy(1.0)), _row(_noisy(1.5, seed=1)), Thresholds())
    assert cell["verdict"] == "slower" and cell["time_ratio"] == pytest.approx(1.5, rel=0.05) and cell["p_value"] < 0.01


def test_small_significant_change_below_threshold_is_not_flagged():
    cell = compare_cell(_row(_noisy(1.0)), _row(_noisy(1.05, seed=1)), Thresholds(time=0.10))
    assert cell["verdict"] == "same" and cell["p_value"] < 0.01


def test_large_change_without_enough_samples_is_inconclusive():
    cell = compare_cell(_row([1.0, 1.01, 0.99]), _row([2.0, 2.01, 1.99]), Thresholds())
    assert cell["verdict"] == "inconclusive" and "cannot reach" in cell["detail"]


def test_unequal_sample_sizes_are_labelled_correctly():
    # pyperf's compare_to mislabels unequal n; here BASE is slow, NEW fast, n differ
    cell = compare_cell(_row(_noisy(2.0, n=12)), _row(_noisy(1.0, n=5, seed=3)), Thresholds())
    assert cell["verdict"] == "faster" and cell["time_ratio"] < 0.6 and cell["n_base"] == 12 and cell["n_new"] == 5


def test_memory_growth_flagged_beyond_floor():
    same_time = _noisy(1.0)
    assert compare_cell(_row(same_time), _row(same_time, mem=20 << 20), Thresholds())["verdict"] == "more memory"
    tiny = compare_cell(_row(same_time, mem=1000), _row(same_time, mem=3000), Thresholds())
    assert tiny["verdict"] != "more memory"  # below the 1 MiB floor


def test_failed_new_cell_is_unmeasurable():
    cell = compare_cell(_row(_noisy(1.0)), _row([], status="timeout", reason="killed"), Thresholds())
    assert cell["verdict"] == "unmeasurable" and "timeout" in cell["detail"]
    assert compare_cell(_row(_noisy(1.0)), None, Thresholds())["verdict"] == "unmeasurable"


def _write(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    for r in rows:
        append_row(path / "init.jsonl", r)
    return path


def test_cli_exit_codes(tmp_path, capsys):
    base = _write(tmp_path / "base", [_row(_noisy(1.0), key="a"), _row(_noisy(1.0), key="b")])
    same = _write(tmp_path / "same", [_row(_noisy(1.0, seed=5), key="a"), _row(_noisy(1.0, seed=6), key="b")])
    slow = _write(tmp_path / "slow", [_row(_noisy(2.0, seed=5), key="a"), _row(_noisy(1.0, seed=6), key="b")])
    broken = _write(tmp_path / "broken", [_row(_noisy(1.0, seed=5), key="a"), _row([], status="crashed", key="b")])
    assert main(["compare", str(base), str(same)]) == EXIT_OK
    assert main(["compare", str(base), str(slow)]) == EXIT_REGRESSION
    assert "slower" in capsys.readouterr().out
    assert main(["compare", str(base), str(broken)]) == EXIT_UNMEASURABLE
    assert main(["compare", str(base), str(tmp_path / "nowhere")]) == 2
    assert main(["compare", str(base), str(same), "--alpha", "2"]) == 2


def test_compare_writes_report_and_history(tmp_path):
    base = _write(tmp_path / "base", [_row(_noisy(1.0), key="a")])
    new = _write(tmp_path / "new", [_row(_noisy(2.0, seed=5), key="a", run_id="r2")])
    report, history = tmp_path / "cmp.html", tmp_path / "history.jsonl"
    assert main(["compare", str(base), str(new), "--report", str(report), "--history", str(history)]) == EXIT_REGRESSION
    page = report.read_text()
    assert "Comparison with the baseline" in page and "slower" in page
    rows = read_rows(history)
    assert len(rows) == 1 and rows[0]["shape"] == "64x32" and rows[0]["machine"].startswith("h|c|2c")
    assert append_history([_row(_noisy(2.0), key="a", run_id="r2")], history) == 0  # no duplicates
