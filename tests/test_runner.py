"""The manager: crash and timeout isolation, resume, skipping by prediction, and rows."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from bench.core import results
from bench.core.launchers import ForkServerLauncher, SpawnLauncher, worker_command
from bench.initcost.schema import ProcessRun
from bench.initcost.worker import run_task
from bench.initcost.runner import Runner, run_interleaved
from bench.initcost.tasks import Task

from .workers import counting as _counting
from .workers import crash_at_32 as _crash
from .workers import hang_at_32 as _hang
from .workers import log_a as _log_a
from .workers import log_b as _log_b
from .workers import ok as _ok
from .workers import raise_at_32 as _raise
from .workers import slow as _slow


def _tasks():
    return [Task("noise_zeros", d, 16, 4) for d in (16, 32, 64)]


@pytest.mark.parametrize(
    "fn,status,reason",
    [(_crash, "crashed", "killed by signal 9"), (_hang, "timeout", "exceeded the 2 s limit"),
     (_raise, "failed", "RuntimeError: CUDA out of memory")],
)
def test_failing_worker_is_recorded_and_run_goes_on(tmp_path, fn, status, reason):
    path = tmp_path / "init.jsonl"
    rows = Runner(path, limit_s=2, worker_fn=fn, progress=False).run(_tasks())
    by_size = {r["d_out"]: r for r in rows}
    assert by_size[32]["status"] == status and reason in by_size[32]["reason"]
    assert by_size[16]["status"] == "ok"
    if status == "timeout":  # a larger shape of the same initializer is not tried after a timeout
        assert by_size[64]["status"] == "skipped" and "already exceeded the limit" in by_size[64]["reason"]
    else:
        assert by_size[64]["status"] == "ok"
    assert len(results.read_rows(path)) == 3  # every row was written as it finished


def test_rerun_skips_done_and_retries_failures(tmp_path):
    path = tmp_path / "init.jsonl"
    log = tmp_path / "calls.txt"
    tasks = [dataclasses.replace(t, options={"log": str(log)}) for t in _tasks()]
    Runner(path, limit_s=2, worker_fn=_raise, progress=False).run(tasks)
    rows = Runner(path, limit_s=2, worker_fn=_counting, progress=False).run(tasks)
    assert log.read_text().split() == ["32"]  # only the failed one ran again
    latest = results.to_frame(rows)
    assert sorted(latest["status"]) == ["ok", "ok", "ok"]


def test_predicted_overrun_is_skipped_with_reason(tmp_path):
    path = tmp_path / "init.jsonl"
    tasks = [Task("loram_dst", d, d, 4, warmups=0, min_values=1) for d in (16, 32, 1024)]
    rows = Runner(path, limit_s=30, worker_fn=_slow, progress=False).run(tasks)
    last = rows[-1]
    assert last["status"] == "skipped" and "predicted" in last["reason"] and last["predicted_s"] > 30


def test_rows_carry_environment_and_task_fields(tmp_path):
    rows = Runner(tmp_path / "r.jsonl", worker_fn=_ok, progress=False).run(_tasks()[:1])
    row = rows[0]
    for key in ("git_commit", "torch_version", "cpu_model", "hostname", "threads", "dtype", "device", "seed", "task_key"):
        assert key in row
    csv_path, json_path = results.export(rows, tmp_path, "init")
    assert csv_path.read_text().startswith("") and "noise_zeros" in csv_path.read_text()


def test_real_worker_measures_an_initializer(tmp_path):
    task = Task("loram_dst", 256, 128, 8, values=2, value_budget_s=1.0)
    (row,) = Runner(tmp_path / "r.jsonl", progress=False).run([task])
    assert row["status"] == "ok"
    assert len(row["values_s"]) == 2 and row["median_s"] > 0 and row["first_s"] > 0
    assert row["reconstruction_rel_err"] < 1e-5
    assert row["weight_bytes"] == 256 * 128 * 4


def test_spawned_worker_path(tmp_path):
    task = Task("noise_zeros", 64, 32, 4, values=1)
    (row,) = Runner(tmp_path / "r.jsonl", progress=False, launcher="spawn").run([task])
    assert row["status"] == "ok" and row["median_s"] >= 0


def test_spawned_worker_crash(tmp_path):
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]
    (row,) = Runner(tmp_path / "r.jsonl", progress=False, launcher="spawn", worker_cmd=cmd).run([_tasks()[0]])
    assert row["status"] == "crashed" and "exit code 3" in row["reason"] and "boom" in row["reason"]


def test_interleaved_runs_alternate_order_and_fill_both_files(tmp_path):
    log = tmp_path / "order.txt"
    tasks = [dataclasses.replace(t, options={"log": str(log)}) for t in _tasks()]
    a = Runner(tmp_path / "a" / "init.jsonl", worker_fn=_log_a, progress=False, run_id="A")
    b = Runner(tmp_path / "b" / "init.jsonl", worker_fn=_log_b, progress=False, run_id="B")
    rows_a, rows_b = run_interleaved(a, b, tasks)
    assert [r["d_out"] for r in rows_a] == [16, 32, 64] and [r["d_out"] for r in rows_b] == [16, 32, 64]
    assert {r["run_id"] for r in rows_a} == {"A"} and {r["run_id"] for r in rows_b} == {"B"}
    assert log.read_text().split() == ["A16", "B16", "B32", "A32", "A64", "B64"]  # A B, B A, A B
    assert len(results.read_rows(tmp_path / "a" / "init.jsonl")) == 3 == len(results.read_rows(tmp_path / "b" / "init.jsonl"))


def test_several_processes_pool_their_values(tmp_path):
    log = tmp_path / "calls.txt"
    task = Task("noise_zeros", 16, 16, 4, processes=3, value_budget_s=30, options={"log": str(log)})
    (row,) = Runner(tmp_path / "r.jsonl", worker_fn=_counting, progress=False).run([task])
    assert log.read_text().split() == ["16", "16", "16"]  # three worker processes
    assert row["processes"] == 3 and len(row["values_s"]) == 3 and len(row["first_values_s"]) == 3


def test_slow_cells_stop_adding_processes(tmp_path):
    log = tmp_path / "calls.txt"
    task = Task("noise_zeros", 16, 16, 4, processes=3, value_budget_s=0.0, options={"log": str(log)})
    (row,) = Runner(tmp_path / "r.jsonl", worker_fn=_counting, progress=False).run([task])
    assert log.read_text().split() == ["16"] and row["processes"] == 1


@pytest.mark.parametrize("launcher", [ForkServerLauncher(run_task, ProcessRun.from_dict),
                                      SpawnLauncher(worker_command("bench.initcost.worker"), ProcessRun.from_dict)],
                         ids=["forkserver", "spawn"])
def test_launchers_share_one_interface(launcher):
    task = Task("loram_dst", 64, 32, 4, values=2, threads=1)
    outcome = launcher.launch(task, 60.0)
    assert outcome.status == "ok" and outcome.reason == ""
    run = outcome.run
    assert run.task_key == task.key and len(run.values_s) == 2 and run.first_s > 0
    assert run.environment["torch_threads"] == 1 and run.environment["loram_ref_path"].endswith("loram_ref")
