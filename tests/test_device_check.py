"""The GPU check's plan, without a GPU (``scripts/device_check.py --dry-run``, what CI can check),
and the optional packages the GPU image lacks.

What must hold: the plan as it stands passes its dry run (every command parses, the limits fit
8 minutes, at most 8 files come back, every dependency is on the image, carried or optional,
and the commands import and report without the optional ones); a broken plan or a missing
package is named; ``--device cpu`` changes the device flags and nothing else; without pyperf
or plotly the commands measure and say what they left out; a results file the check cannot
read in full costs the rows it cannot read, never the step's status or the run's summary.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("device_check", ROOT / "scripts" / "device_check.py")
device_check = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("device_check", device_check)  # dataclasses look their module up there
_spec.loader.exec_module(device_check)


def test_the_dry_run_passes_and_shows_the_plan():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: the plan is ready" in proc.stdout
    for step in device_check.PLAN:
        assert f"  {step.name}" in proc.stdout
    assert sum(s.limit_s for s in device_check.PLAN) <= device_check.TOTAL_LIMIT_S == 480
    assert len(device_check.OUTPUTS) <= device_check.MAX_FILES


def test_a_plan_that_does_not_parse_or_fit_is_named():
    bad = device_check.Step("run", ("loram-bench", "run", "--preset", "llama-3-70b", "--no-such-flag"), 30)
    slow = device_check.Step("slow", ("loram-bench", "list"), 500)
    problems = device_check.plan_problems((bad, slow))
    assert any("step 'run'" in p and "does not parse" in p for p in problems)
    assert any("sum to 530 s" in p for p in problems)
    many = tuple(device_check.Step(f"s{i}", ("loram-bench", "list"), 1, result=f"f{i}.jsonl") for i in range(7))
    assert any("brings back 9 files" in p for p in device_check.plan_problems(many))


def test_a_dependency_neither_on_the_image_nor_carried_nor_optional_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(device_check, "requirement_names", lambda: ["torch", "plotly", "einops-extra"])
    assert device_check.missing_packages() == ["einops-extra"]
    (tmp_path / "einops_extra-1.0-py3-none-any.whl").write_bytes(b"")
    assert device_check.missing_packages(tmp_path) == []  # carried as a wheel


def test_every_requirement_of_the_project_is_read():
    names = device_check.requirement_names()
    assert {"torch", "transformers", "peft", "plotly", "pyperf", "gguf", "pytest"} <= set(names)


def test_the_cpu_try_changes_the_device_flags_and_nothing_else(tmp_path):
    tests, run = device_check.PLAN[0], device_check.PLAN[1]
    argv = device_check.command(tests, tmp_path, "cpu")
    assert argv[argv.index("-m", 2) + 1] == "cuda"  # pytest's marker stays
    assert argv[-1] == str(ROOT / "tests" / "test_cuda.py")
    argv = device_check.command(run, tmp_path, "cpu")
    assert argv[argv.index("--device") + 1] == "cpu" and "cuda" not in argv
    assert argv[:3] == [sys.executable, "-m", "bench.cli"] and argv[-2:] == ["--out", str(tmp_path)]


def test_without_pyperf_the_init_files_are_written_and_a_note_says_what_is_left_out(monkeypatch, tmp_path, capsys):
    import bench.initcost.pyperf_format as fmt

    real = importlib.util.find_spec
    monkeypatch.setattr(fmt.importlib.util, "find_spec", lambda name, *a: None if name == "pyperf" else real(name, *a))
    row = {"kind": "init", "initializer": "loram_dst", "d_out": 8, "d_in": 8, "rank": 2, "status": "ok",
           "task_key": "k", "runs": [{"values_s": [0.1, 0.2]}]}
    csv_path, _ = fmt.export_init([row], tmp_path)
    assert csv_path.is_file() and not (tmp_path / "init.pyperf.json").exists()
    assert "init.pyperf.json not written: pyperf is not installed" in capsys.readouterr().err


def test_without_plotly_a_report_is_not_written_and_the_command_says_so(monkeypatch, tmp_path, capsys):
    import bench.cli.report as cli_report

    real = importlib.util.find_spec
    monkeypatch.setattr(cli_report.importlib.util, "find_spec", lambda name, *a: None if name == "plotly" else real(name, *a))
    assert cli_report.report(tmp_path, tmp_path / "report.html") == 1
    assert not (tmp_path / "report.html").exists()
    assert "not written: plotly is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--wheels", "/no/such/folder", "--dry-run"]])
def test_bad_arguments_are_named(argv):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), *argv], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--wheels /no/such/folder is not a folder" in proc.stderr


def _writer(text: str) -> tuple[str, ...]:
    """A step's argv that writes ``text`` into ``init.jsonl`` in its folder, then exits 0."""
    return (sys.executable, "-c", f"open('init.jsonl', 'w').write({text!r})")


def test_a_results_line_cut_by_a_stopped_step_costs_that_row_only(tmp_path):
    whole = '{"initializer": "loram_dst", "d_out": 8, "d_in": 8, "status": "ok", "floor_ratio": 1.1}\n'
    step = device_check.Step("run", _writer(whole + '{"initializer": "lor'), 30, result="init.jsonl")
    with (tmp_path / "log").open("w") as log:
        outcome = device_check.run_step(step, tmp_path, dict(os.environ), log)
    assert outcome.status == "ok"
    assert outcome.figures == {"loram_dst 8x8": {"status": "ok", "median_s": None, "floor_s": None,
                                                 "floor_ratio": 1.1, "peak_gpu_allocated_bytes": None,
                                                 "cuda_event_gap": None, "calib_read_GBps": None,
                                                 "calib_rw_GBps": None, "calib_lowrank_GFLOPs": None,
                                                 "calib_projection_GFLOPs": None}}


def test_results_the_check_cannot_read_are_named_and_the_step_keeps_its_status(tmp_path):
    step = device_check.Step("run", _writer('{"initializer": "loram_dst", "status": "ok"}\n'), 30, result="init.jsonl")
    with (tmp_path / "log").open("w") as log:
        outcome = device_check.run_step(step, tmp_path, dict(os.environ), log)
    assert outcome.status == "ok"
    assert set(outcome.figures) == {"unreadable"} and "init.jsonl: KeyError" in outcome.figures["unreadable"]
