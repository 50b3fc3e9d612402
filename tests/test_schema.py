"""The result schema: runs, derived statistics, merge refusals, versions and the upgrade
of a results folder written by the first release (``tests/fixtures/results_v1``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.initcost.history import append_history
from bench.core.identity import cell_key
from bench.initcost.metrics import METRICS, Gate, Merge, derive
from bench.core.results import append_row, read_rows
from bench.initcost.runner import Runner
from bench.initcost.schema import SCHEMA_VERSION, Measurement, ProcessRun, SchemaError, merge_runs, normalize_row, upgrade_row
from bench.initcost.tasks import Task

from .workers import fake_run as _fake_worker

V1 = Path(__file__).parent / "fixtures" / "results_v1"


def _raw(name: str) -> list[dict]:
    return [json.loads(line) for line in (V1 / name).read_text().splitlines()]


def test_v1_init_rows_upgrade_with_the_same_keys_and_numbers():
    raw = _raw("init.jsonl")
    rows = read_rows(V1 / "init.jsonl")
    assert len(rows) == len(raw) == 11
    assert all("schema_version" not in r for r in raw)
    for old, new in zip(raw, rows):
        assert new["schema_version"] == SCHEMA_VERSION and new["upgraded_from"] == 1
        assert cell_key(new) == new["task_key"] == old["task_key"]  # resume and compare keep matching old rows
        assert new["status"] == old["status"] and new["reason"] == old["reason"]
        if old["status"] == "ok":
            assert len(new["runs"]) == 1 and new["values_s"] == old["values_s"]
            assert new["median_s"] == pytest.approx(old["median_s"])
            assert new.get("peak_cpu_extra_bytes") == old.get("peak_cpu_extra_bytes")
            assert new["first_s"] == old["first_s"]
            assert new["processes"] == old["processes"]  # kept from schema 1, not rebuilt as 1
            assert normalize_row(new)["processes"] == old["processes"]  # and kept when read again
            if old["processes"] > 1:
                assert new["first_values_s"] == old["first_values_s"]
        else:
            assert new["runs"] == []
    assert {r["status"] for r in rows} == {"ok", "failed", "skipped"}


def test_v1_loss_and_history_rows_load():
    for name in ("loss.jsonl", "history.jsonl"):
        rows = read_rows(V1 / name)
        assert rows and all(r["schema_version"] == SCHEMA_VERSION for r in rows)
        assert [{k: v for k, v in r.items() if k != "schema_version"} for r in rows] == _raw(name)


def test_a_v1_folder_resumes_and_reports(tmp_path):
    folder = tmp_path / "res"
    shutil.copytree(V1, folder)
    tasks = [Task.from_dict({k: v for k, v in r.items() if k in Task.__dataclass_fields__} | {"options": {}})
             for r in _raw("init.jsonl")]
    rows, pending = Runner(folder / "init.jsonl", limit_s=30, progress=False).pending(tasks)
    assert [t.initializer for t in pending] == ["gaussian"]  # only the failed cell is measured again
    _, pending = Runner(folder / "init.jsonl", limit_s=120, progress=False).pending(tasks)
    assert [t.initializer for t in pending] == ["gaussian", "noise_zeros"]  # a skip under 30 s is retried under 120 s
    from reports.html import build_report

    page = build_report(folder, tmp_path / "r.html").read_text()
    assert "All init rows" in page and "Short-run loss" in page and "loram_dst" in page


def test_rows_written_carry_the_schema_version(tmp_path):
    rows = Runner(tmp_path / "init.jsonl", progress=False, worker_fn=_fake_worker).run([Task("noise_zeros", 16, 8, 2)])
    assert json.loads((tmp_path / "init.jsonl").read_text())["schema_version"] == SCHEMA_VERSION == rows[0]["schema_version"]
    assert append_history(rows, tmp_path / "history.jsonl") == 1
    assert json.loads((tmp_path / "history.jsonl").read_text())["schema_version"] == SCHEMA_VERSION
    # a row without a version is schema 1 (hand-made files, the first release)
    append_row(tmp_path / "x.jsonl", {"kind": "loss", "initializer": "noise_zeros", "step": 1})
    assert read_rows(tmp_path / "x.jsonl") == [{"kind": "loss", "initializer": "noise_zeros", "step": 1,
                                                "schema_version": SCHEMA_VERSION}]


def test_a_newer_schema_is_refused_with_advice():
    with pytest.raises(SchemaError, match="newer than this loram-bench reads.*upgrade"):
        upgrade_row({"schema_version": SCHEMA_VERSION + 1, "kind": "init"})


def _run(values, first, peak, env=None, key="") -> ProcessRun:
    return ProcessRun(task_key=key, first_s=first, values_s=values, peak_cpu_extra_bytes=peak, worker_wall_s=1.0,
                      environment=env or {"torch_threads": 2})


def test_statistics_are_derived_once_from_the_runs():
    task = Task("loram_dst", 64, 32, 4)
    cell = merge_runs(task, [_run([1.0, 3.0], 0.5, 10), _run([2.0, 4.0], 0.7, 30), _run([5.0], 0.9, 20)])
    stats = cell.stats()
    assert stats["values_s"] == [1.0, 3.0, 2.0, 4.0, 5.0] and stats["median_s"] == 3.0 and stats["mean_s"] == 3.0
    assert stats["peak_cpu_extra_bytes"] == 30  # Merge.MAX
    assert stats["first_s"] == 0.7 and stats["first_values_s"] == [0.5, 0.7, 0.9]  # Merge.MEDIAN
    assert stats["worker_wall_s"] == 3.0 and stats["processes"] == 3  # Merge.SUM
    row = cell.to_row()
    assert Measurement.from_row(row).stats() == stats  # a written row rebuilds the same cell


def test_merge_refuses_runs_of_another_cell_or_environment():
    task = Task("loram_dst", 64, 32, 4)
    with pytest.raises(SchemaError, match="measured cell"):
        merge_runs(task, [_run([1.0], 1.0, 1, key=task.key), _run([1.0], 1.0, 1, key=Task("pissa", 64, 32, 4).key)])
    with pytest.raises(SchemaError, match="another environment.*torch_threads"):
        merge_runs(task, [_run([1.0], 1.0, 1), _run([1.0], 1.0, 1, env={"torch_threads": 1})])


def test_unmergeable_runs_become_a_failed_row(tmp_path):
    class TwoEnvironments:
        name = "test"
        calls = 0

        def launch(self, task, limit_s, memory_limit_bytes=None):
            from bench.core.launchers import Outcome

            TwoEnvironments.calls += 1
            return Outcome("ok", _run([0.1], 0.1, 1, env={"torch_threads": TwoEnvironments.calls}))

    (row,) = Runner(tmp_path / "i.jsonl", launcher=TwoEnvironments(), progress=False).run(
        [Task("noise_zeros", 16, 8, 2, processes=2, value_budget_s=30)])
    assert row["status"] == "failed" and "could not be merged" in row["reason"]


def test_cuda_event_gap_is_the_largest_relative_difference():
    run = ProcessRun(first_s=1.0, first_event_s=0.9, values_s=[0.5, 0.25], event_values_s=[0.5, 0.2])
    assert run.cuda_event_gap == pytest.approx(0.2)
    assert ProcessRun(values_s=[0.5]).cuda_event_gap is None  # CPU: no events
    assert derive([run.as_dict(), ProcessRun(values_s=[1.0], event_values_s=[1.3]).as_dict()])["cuda_event_gap"] == pytest.approx(0.3)


def test_the_metric_table_declares_merge_and_gate_for_every_metric():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    assert [m.name for m in METRICS if m.gate is Gate.TEST] == ["median_s"]
    assert {m.name for m in METRICS if m.gate is Gate.THRESHOLD} == {"peak_cpu_extra_bytes", "peak_gpu_allocated_bytes"}
    assert all(isinstance(m.merge, Merge) and m.unit in ("s", "bytes", "ratio") for m in METRICS)
