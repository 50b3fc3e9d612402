"""No child process of the harness imports from the folder loram-bench is run from.

A folder holds modules named like what the harness imports (``conftest.PLANTED``: ``json``,
``pickle``, ``torch``, ``numpy``, ``loram_ref``, ``bench``); importing any of them leaves a
marker and fails. ``run`` (fork server, forked workers, the calibration), ``layer-loss``,
``sharded`` (``torchrun`` and its ranks) and ``continuous`` (the base tree's workers) run
from there (``conftest.planted_runs``) and must leave no marker; so must the spawned
workers of the CUDA path, run on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.core.children import child_env, import_path

from .conftest import _PLANTED_SOURCE, PLANTED


@pytest.fixture()
def planted(tmp_path, monkeypatch):
    """A working folder full of planted modules (``conftest.PLANTED``); returns (folder, marker folder)."""
    folder, marks = tmp_path / "work", tmp_path / "marks"
    folder.mkdir()
    marks.mkdir()
    for name in PLANTED:
        (folder / f"{name}.py").write_text(_PLANTED_SOURCE)
    monkeypatch.setenv("LORAM_TEST_MARKS", str(marks))
    return folder, marks


@pytest.mark.parametrize("command", ["run", "layer-loss", "sharded", "continuous"])
def test_no_child_imports_from_the_working_folder(planted_runs, command):
    out = planted_runs.runs[command]
    assert out.returncode == 0, out.stderr[-2000:]
    assert planted_runs.marks[command] == [], "imported from the working folder by a child"


def test_spawned_workers_import_nothing_from_the_working_folder(planted, monkeypatch):
    """The CUDA path's launchers (``python -m bench.initcost.worker``, ``python -m bench.gate.trees``), on CPU."""
    from bench.core.launchers import SpawnLauncher
    from bench.initcost.tasks import Task
    from bench.gate.trees import Tree, checkout_root

    folder, marks = planted
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))  # even with the folder on this process's path
    task = Task("noise_zeros", 32, 32, 4, values=1, min_values=1, max_fidelity_elements=0)
    for cmd in ([sys.executable, "-m", "bench.initcost.worker"],
                [sys.executable, "-m", "bench.gate.trees", Tree("new", str(checkout_root())).to_json()]):
        outcome = SpawnLauncher(cmd).launch(task, 120)
        assert outcome.status == "ok", outcome.reason
    assert sorted(p.name for p in marks.iterdir()) == []


def test_child_paths_drop_the_working_folder_and_keep_bench_importable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = import_path(["", ".", str(tmp_path), "/usr/lib/python3/dist-packages"])
    assert path[:1] == ["/usr/lib/python3/dist-packages"] and str(tmp_path) not in path
    env = child_env(base={"PYTHONPATH": os.pathsep.join(["", str(tmp_path), "/opt/x"]), "HOME": "/root"})
    assert env["PYTHONSAFEPATH"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == "/opt/x" and str(tmp_path) not in env["PYTHONPATH"]
    # a child of this interpreter finds bench with that environment, from the planted-free tmp folder
    out = subprocess.run([sys.executable, "-c", "import bench, sys; print(bench.__file__)"], cwd=tmp_path,
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("bench/__init__.py"), out.stderr
