"""``continuous`` leaves no base worktree behind: not on Ctrl-C, SIGTERM (a cancelled CI
job) or SIGHUP (a closed terminal), and after a SIGKILL the next run prunes it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.trees import WORKTREE_PREFIX, checkout_root, prune_stale_worktrees

ROOT = checkout_root()


def _ours() -> list[str]:
    """The worktrees of gate runs (by their folder name) the repository lists."""
    out = subprocess.run(["git", "-C", str(ROOT), "worktree", "list", "--porcelain"], capture_output=True, text=True)
    return [line.split(" ", 1)[1] for line in out.stdout.splitlines()
            if line.startswith("worktree ") and Path(line.split(" ", 1)[1]).parent.name.startswith(WORKTREE_PREFIX)]


def _start(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """A gate run of many rounds, returned once its worktree exists and it is measuring."""
    before = set(_ours())
    out = tmp_path / "gate"
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("loram-bench")), "continuous", "HEAD", "--shape", "64x64",
         "--initializers", "noise_zeros", "--screen-rounds", "500", "--gate-unchanged", "--out", str(out),
         "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell may ignore SIGINT
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = set(_ours()) - before
        if new and (out / "continuous.jsonl").is_file():
            return proc, new.pop()
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the gate run did not start measuring: {proc.communicate()[1][-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["INT", "TERM", "HUP"])
def test_a_stopped_gate_run_removes_its_worktree(tmp_path, sig):
    proc, tree = _start(tmp_path)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), stderr[-2000:]
    assert tree not in _ours() and not Path(tree).parent.exists()
    assert "the same command resumes" in stderr.splitlines()[-1]


def test_a_killed_gate_runs_worktree_is_pruned_by_the_next_run(tmp_path):
    proc, tree = _start(tmp_path)
    proc.kill()  # SIGKILL: no handler runs, the worktree stays
    proc.wait(timeout=30)
    assert tree in _ours() and Path(tree).is_dir()
    assert tree in prune_stale_worktrees(ROOT)  # what the next run does first
    assert tree not in _ours() and not Path(tree).parent.exists()


def test_a_live_runs_worktree_is_not_pruned(tmp_path):
    proc, tree = _start(tmp_path)
    try:
        assert tree not in prune_stale_worktrees(ROOT) and tree in _ours()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert tree not in _ours()
