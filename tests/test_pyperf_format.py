"""Init results in pyperf's JSON format: written next to every init.jsonl, read back
unchanged, and opened by pyperf's own command line (stats, compare_to)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.initcost.pyperf_format import benchmark_name, read_pyperf, to_suite, write_pyperf
from bench.core.results import read_rows
from bench.initcost.pyperf_format import export_init
from bench.initcost.runner import Runner
from bench.initcost.tasks import Task

pyperf = pytest.importorskip("pyperf")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A real results folder: two cells, two worker processes each, and a skipped cell."""
    out = tmp_path_factory.mktemp("results")
    tasks = [Task(name, 96, 64, 4, values=3, min_values=3, processes=2, value_budget_s=5.0, max_fidelity_elements=0)
             for name in ("loram_dst", "noise_zeros")]
    rows = Runner(out / "init.jsonl", progress=False).run(tasks)
    rows.append({**rows[0], "task_key": "skipped-cell", "initializer": "pissa", "status": "skipped", "runs": []})
    export_init(rows, out)
    return out


def test_a_results_folder_round_trips_through_pyperf(folder):
    rows = [r for r in read_rows(folder / "init.jsonl") if r["status"] == "ok"]
    back = read_pyperf(folder / "init.pyperf.json")
    assert set(back) == {r["task_key"] for r in rows}  # the skipped cell has no values: left out
    for row in rows:
        cell = back[row["task_key"]]
        assert cell["runs"] == [run["values_s"] for run in row["runs"]]  # grouped by worker process, values exact
        assert cell["warmups"] == [[run["first_s"]] for run in row["runs"]]
        assert cell["identity"]["initializer"] == row["initializer"] and cell["identity"]["d_out"] == row["d_out"]
    suite = pyperf.BenchmarkSuite.load(str(folder / "init.pyperf.json"))
    bench = suite.get_benchmark(benchmark_name(rows[0]))
    assert bench.get_unit() == "second" and bench.get_nrun() == 2
    assert bench.get_metadata()["git_commit"] == rows[0]["git_commit"] or not rows[0]["git_commit"]


def test_pyperf_command_line_opens_our_files(folder, tmp_path):
    path = folder / "init.pyperf.json"
    stats = subprocess.run([sys.executable, "-m", "pyperf", "stats", str(path)], capture_output=True, text=True)
    assert stats.returncode == 0, stats.stderr
    assert "loram_dst 96x64 r4 float32 cpu t2" in stats.stdout and "Number of run with values: 2" in stats.stdout
    other = tmp_path / "other.json"
    data = json.loads(path.read_text())
    for bench in data["benchmarks"]:  # the same cells, twice as slow
        for run in bench["runs"]:
            run["values"] = [2 * v for v in run["values"]]
    other.write_text(json.dumps(data))
    cmp = subprocess.run([sys.executable, "-m", "pyperf", "compare_to", str(path), str(other)], capture_output=True,
                         text=True)
    assert cmp.returncode == 0, cmp.stderr
    assert "2.00x slower" in cmp.stdout


def test_no_values_means_no_file(tmp_path):
    stale = tmp_path / "init.pyperf.json"
    stale.write_text("{}")
    assert to_suite([{"kind": "init", "status": "failed", "task_key": "k", "runs": []}]) is None
    assert write_pyperf([], stale) is None and not stale.exists()
