"""``continuous`` leaves no base worktree behind: not on Ctrl-C, SIGTERM (a cancelled CI
job) or SIGHUP (a closed terminal), and after a SIGKILL the next run prunes it.

The signals are delivered twice: to this process inside ``bench.gate.trees.worktree`` (each
signal, in a second), and to a real ``loram-bench continuous`` run (SIGTERM, what CI
sends); the SIGKILL is sent to a real run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gate.trees import WORKTREE_PREFIX, Terminated, checkout_root, prune_stale_worktrees, resolve_revision, worktree

ROOT = checkout_root()


def _ours() -> list[str]:
    """The worktrees of gate runs (by their folder name) the repository lists."""
    out = subprocess.run(["git", "-C", str(ROOT), "worktree", "list", "--porcelain"], capture_output=True, text=True)
    return [line.split(" ", 1)[1] for line in out.stdout.splitlines()
            if line.startswith("worktree ") and Path(line.split(" ", 1)[1]).parent.name.startswith(WORKTREE_PREFIX)]


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated),
                                         (signal.SIGHUP, Terminated)], ids=["INT", "TERM", "HUP"])
def test_a_signal_inside_the_worktree_removes_it(sig, raised):
    # Ctrl-C as Python's default (a test run in the background of a shell inherits SIGINT ignored)
    saved_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    seen = []
    try:
        with pytest.raises(raised):
            with worktree(ROOT, resolve_revision(ROOT, "HEAD")) as path:
                seen.append(str(path))
                assert str(path) in _ours()
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler raises before this ends
    finally:
        signal.signal(signal.SIGINT, saved_int)
    assert seen and seen[0] not in _ours() and not Path(seen[0]).parent.exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before  # handlers restored


def _start(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """A gate run of many rounds, returned once its worktree exists and it is measuring."""
    before = set(_ours())
    out = tmp_path / "gate"
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("loram-bench")), "continuous", "HEAD", "--shape", "64x64",
         "--initializers", "noise_zeros", "--screen-rounds", "500", "--gate-unchanged", "--out", str(out),
         "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_a_terminated_gate_run_removes_its_worktree_and_says_it_resumes(tmp_path):
    proc, tree = _start(tmp_path)
    assert tree not in prune_stale_worktrees(ROOT)  # a live run's worktree is never pruned
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert tree not in _ours() and not Path(tree).parent.exists()
    assert stderr.splitlines()[-1].startswith("terminated by signal 15") and "the same command resumes" in stderr


def test_a_killed_gate_runs_worktree_is_pruned_by_the_next_run(tmp_path):
    proc, tree = _start(tmp_path)
    proc.kill()  # SIGKILL: no handler runs, the worktree stays
    proc.wait(timeout=30)
    assert tree in _ours() and Path(tree).is_dir()
    assert tree in prune_stale_worktrees(ROOT)  # what the next run does first
    assert tree not in _ours() and not Path(tree).parent.exists()
