"""Nothing lost, nothing hidden: damaged results files, worker lifecycle, failure records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.core import results
from bench.initcost.schema import ProcessRun
from bench.core.launchers import ForkServerLauncher
from bench.core.results import ResultsFileError, append_row, read_rows, rejected_path
from bench.initcost.runner import Runner
from bench.initcost.tasks import Task
from bench.initcost.worker import _invariant_error

from .workers import counting as _logged
from .workers import ok as _ok
from .workers import oom_in_initializer as _oom_in_initializer
from .workers import sleepy as _sleepy
from .workers import slow as _slow_prediction

ROOT = Path(__file__).resolve().parent.parent


def _tasks(log: Path) -> list[Task]:
    return [Task("noise_zeros", d, 16, 4, options={"log": str(log)}) for d in (16, 32, 64)]


def _measure(path: Path, log: Path, **kw) -> list[dict]:
    return Runner(path, limit_s=20, worker_fn=_logged, progress=False, **kw).run(_tasks(log))


def _ok_keys(path: Path) -> list[str]:
    return [r["task_key"] for r in read_rows(path) if r["status"] == "ok"]


def test_a_torn_last_line_is_set_aside_and_only_its_cell_is_measured_again(tmp_path, capsys):
    path, log = tmp_path / "init.jsonl", tmp_path / "calls.txt"
    _measure(path, log)
    data = path.read_bytes()
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1 + 40])  # the last row cut after 40 bytes
    log.unlink()
    _measure(path, log)
    assert log.read_text().split() == ["64"]  # exactly the missing cell
    keys = _ok_keys(path)
    assert len(keys) == 3 == len(set(keys))  # no duplicates, nothing glued
    side = [json.loads(line) for line in rejected_path(path).read_text().splitlines()]
    assert len(side) == 1 and side[0]["line"] == 3 and "cut off" in side[0]["why"]
    assert "init.jsonl:3: cut off" in capsys.readouterr().err


def test_a_corrupt_line_is_reported_with_its_number_and_kept_aside(tmp_path, capsys):
    path, log = tmp_path / "init.jsonl", tmp_path / "calls.txt"
    _measure(path, log)
    lines = path.read_text().splitlines()
    lines[1] = "\x00garbage{not json"
    path.write_text("\n".join(lines) + "\n")
    assert len(read_rows(path)) == 2
    assert "init.jsonl:2: not JSON" in capsys.readouterr().err  # a reader says what it skipped
    log.unlink()
    _measure(path, log)
    assert log.read_text().split() == ["32"]
    assert sorted(_ok_keys(path)) == sorted({t.key for t in _tasks(log)})
    assert "garbage" in rejected_path(path).read_text()


def test_an_append_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"b": ')
    append_row(path, {"c": 3})
    assert read_rows(path) == [{"a": 1, "schema_version": 2}, {"c": 3, "schema_version": 2}]


def test_an_unwritable_results_file_fails_before_measuring(tmp_path):
    path, log = tmp_path / "init.jsonl", tmp_path / "calls.txt"
    path.mkdir()  # a folder where the file should be: no user, root included, can append to it
    with pytest.raises(ResultsFileError, match="not writable"):
        _measure(path, log)
    assert not log.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_a_read_only_results_file_fails_before_measuring(tmp_path):
    path, log = tmp_path / "init.jsonl", tmp_path / "calls.txt"
    path.write_text("")
    path.chmod(0o444)
    with pytest.raises(ResultsFileError, match="not writable"):
        _measure(path, log)
    assert not log.exists()


def test_skipped_cells_are_retried_when_the_limit_grows(tmp_path):
    path = tmp_path / "init.jsonl"
    tasks = [Task("loram_dst", d, d, 4, warmups=0, min_values=1) for d in (16, 32, 1024)]
    rows = Runner(path, limit_s=30, worker_fn=_slow_prediction, progress=False).run(tasks)
    assert rows[-1]["status"] == "skipped" and rows[-1]["limit_s"] == 30
    again = Runner(path, limit_s=30, worker_fn=_slow_prediction, progress=False).pending(tasks)[1]
    assert again == []  # the same limit: nothing to do
    rows = Runner(path, limit_s=1e7, worker_fn=_slow_prediction, progress=False).run(tasks)
    assert results.to_frame(rows).set_index("d_out").loc[1024, "status"] == "ok"


def test_a_timeout_names_the_real_limit_and_a_result_is_never_called_a_crash(tmp_path):
    launcher = ForkServerLauncher(_sleepy, ProcessRun.from_dict)
    # sleeps around the limit: whichever side of it a worker lands, it is ok or a timeout
    outcomes = [launcher.launch(Task("noise_zeros", 16, 16, 4, options={"sleep": s}), 1.5)
                for s in (0.0, 1.3, 1.45, 1.5, 1.55, 1.7, 4.0)]
    assert {o.status for o in outcomes} <= {"ok", "timeout"}
    assert outcomes[0].status == "ok" and outcomes[-1].status == "timeout"
    assert all("exceeded the 1.5 s limit" in o.reason for o in outcomes if o.status == "timeout")
    assert all(o.run is not None and o.run.values_s for o in outcomes if o.status == "ok")


def _manager_script(tmp_path: Path) -> Path:
    script = tmp_path / "manager.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from bench.initcost.runner import Runner
from bench.initcost.tasks import Task
from tests.workers import hang_and_tell
if __name__ == "__main__":
    pid_file = {str(tmp_path / 'worker.pid')!r}
    hang = [sys.executable, "-c", f"import os, time; open({{pid_file!r}}, 'w').write(str(os.getpid())); time.sleep(300)"]
    Runner(Path({str(tmp_path / 'init.jsonl')!r}), limit_s=300, worker_fn=hang_and_tell, worker_cmd=hang,
           progress=False, launcher=sys.argv[1]).run(
        [Task("noise_zeros", 16, 16, 4, options={{"pid_file": {str(tmp_path / 'worker.pid')!r}}})])
""")
    return script


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _start_manager(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(_manager_script(tmp_path)), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "worker.pid"
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_file.is_file(), proc.communicate(timeout=5)
    return proc, int(pid_file.read_text())


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


@pytest.mark.parametrize("launcher", ["auto", "spawn"])
def test_a_killed_manager_leaves_no_worker(tmp_path, launcher):
    proc, worker = _start_manager(tmp_path, launcher)
    assert _alive(worker)
    proc.kill()
    proc.wait(timeout=10)
    assert _gone_within(worker, 10), "the worker outlived its manager"


def test_ctrl_c_stops_cleanly_with_one_line_and_a_resumable_folder(tmp_path):
    out = tmp_path / "res"
    cfg = tmp_path / "tiny"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                                                 "num_hidden_layers": 1, "num_attention_heads": 4,
                                                 "num_key_value_heads": 2, "vocab_size": 100}))
    argv = [sys.executable, "-m", "bench.cli", "run", "--preset", str(cfg), "--initializers", "pissa", "loram_dst",
            "--rank", "4", "--values", "1000000", "--value-budget", "4", "--processes", "1", "--threads", "1",
            "--out", str(out), "--no-progress"]
    # SIGINT back to its default in the child: a test run started in the background of a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises Ctrl-C
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (out / "init.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert lines[-1].startswith("interrupted; what finished is in") and "Traceback" not in stderr
    assert all(r["status"] == "ok" for r in read_rows(out / "init.jsonl"))


def test_memory_limit_records_out_of_memory_with_its_phase(tmp_path):
    path = tmp_path / "init.jsonl"
    (row,) = Runner(path, worker_fn=_oom_in_initializer, memory_limit_bytes=256 << 20, progress=False).run(
        [Task("noise_zeros", 16, 16, 4, options={"bytes": 2 << 30})])
    assert row["status"] == "oom" and row["phase"] == "initializer" and "out of memory in the initializer" in row["reason"]
    (row,) = Runner(tmp_path / "b.jsonl", memory_limit_bytes=64 << 20, progress=False).run(
        [Task("loram_dst", 8192, 8192, 4, threads=1)])  # a 256 MiB weight under a 64 MiB cap
    assert row["status"] == "oom" and row["phase"] == "setup"


def test_diagnostics_never_form_the_full_product():
    import torch

    from bench.core.measure import cpu_peak
    from loram_ref import initialize

    w = torch.randn(4096, 4096)
    init = initialize("loram_dst", w, 16)
    with cpu_peak() as peak:
        diag = _invariant_error(init, w)
    assert diag["reconstruction_rel_err"] < 1e-5 and diag["delta_rel_norm"] > 0
    assert peak.extra_bytes < 4096 * 4096 * 4 / 2  # well under one m x n fp32 matrix (64 MiB)


def test_a_failing_diagnostic_keeps_the_timings(tmp_path, monkeypatch):
    import bench.initcost.worker as worker

    def boom(*_a):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(worker, "_invariant_error", boom)
    run = worker.run_task(Task("loram_dst", 64, 32, 4, values=2, threads=1))
    assert len(run["values_s"]) == 2 and run["diagnostics_error"].startswith("out of memory")


def test_a_baseline_pair_keeps_each_folders_tables_and_history(tmp_path):
    from bench.cli.suites import measure_init

    tasks = [Task("noise_zeros", d, 16, 4) for d in (16, 32)]
    out, base = tmp_path / "new", tmp_path / "base"
    added = measure_init(tasks, out, base, sources=[], progress=False, worker_fn=_ok)
    assert added == 2  # the new folder's own rows went to its history
    for folder in (out, base):
        run_ids = {r["run_id"] for r in read_rows(folder / "init.jsonl")}
        table = json.loads((folder / "init.json").read_text())
        assert {r["run_id"] for r in table} == run_ids  # each folder's table holds its own rows
    history = read_rows(out / "history.jsonl")
    assert {r["run_id"] for r in history} == {r["run_id"] for r in read_rows(out / "init.jsonl")}
