"""Launchers: run one task in a fresh worker process under a time limit.

One interface (asv's launchers behind ``asv/runner.py``): :meth:`Launcher.launch` takes a
task and a limit and returns an :class:`Outcome`: what the worker reported (decoded by the
benchmark's ``decode``) or a failure with its reason. A benchmark gives its worker body
(``worker_fn``, run in a forked child) and its worker module (``python -m``, spawned);
:func:`launcher_for` is the one choice between them. Benchmarks schedule; launchers only
start, watch and kill processes; workers follow ``bench.core.protocol``.

* :class:`ForkServerLauncher` (CPU, Linux): the worker is forked from a fork server, a
  clean process that has imported torch and run no kernel (saves ~2 s of imports per
  measurement; the child's first call is still cold; forking the manager instead could
  deadlock a child in an OpenMP pool the manager had started).
* :class:`SpawnLauncher` (CUDA, which cannot survive a fork, or anywhere): a fresh
  ``python -m <worker module>`` with the task as JSON on stdin.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from bench.core.children import child_env, forked_child_context, import_path
from bench.core.layout import MMAP_THRESHOLD
from bench.core.layout import shuffle as shuffle_layout
from bench.core.protocol import MEMORY_LIMIT_ENV, RESULT_PREFIX, apply_memory_limit, failure_message
from bench.core.rows import CRASHED, FAILED, OK, OOM, TIMEOUT

#: A task: any frozen dataclass with ``to_dict()`` (what a spawned worker reads from stdin).
Task = Any

#: glibc raises its mmap threshold after freeing a large block, after which freed memory
#: stays in RSS and a later region's peak hides inside it. A fixed threshold keeps every
#: large tensor mmapped, so RSS (and VmHWM) follow what is live. One malloc arena: every
#: thread allocates from the main heap, which ``bench.core.layout`` shifts (a thread's own arena
#: would be mapped later, aligned to 64 MiB, and put every large mapping after it at an
#: aligned address). A passive OpenMP wait policy keeps idle threads from spinning on the
#: other cores. (The spin settings a training command sets for itself are overridden:
#: workers sleep at once.)
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_ARENA_MAX": "1", "OMP_WAIT_POLICY": "PASSIVE",
              "GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": "0"}


@dataclass
class Outcome:
    """What a launch produced: ``run`` when ``status`` is ok (a :class:`ProcessRun`, or what
    the launcher's ``decode`` made of the message), else the ``reason`` (and the worker's
    ``phase`` where it reported one)."""

    status: str
    run: Any = None
    reason: str = ""
    phase: str = ""


#: ``decode(message) -> run``: what a launcher makes of a worker's successful message (an
#: init cell's ``ProcessRun``; the layer-loss worker's plain dict)
Decode = Callable[[dict[str, Any]], Any]

#: What the fork server imports before its first fork: torch, the reference package, and
#: each worker module a benchmark registers with :func:`preload` (a forked worker then
#: imports nothing; one registered after the server started is imported by each child).
_PRELOAD = ["torch", "loram_ref"]


def preload(module: str) -> None:
    """Have the fork server import ``module`` (a benchmark's worker module) before it forks."""
    if module not in _PRELOAD:
        _PRELOAD.append(module)


def _from_message(message: dict[str, Any], decode: Decode = dict) -> Outcome:
    if message.get("status") in (FAILED, OOM):
        return Outcome(message["status"], reason=message.get("reason", ""), phase=message.get("phase", ""))
    return Outcome(OK, decode(message))


#: The longest single wait the OS accepts comfortably (a larger --limit waits this long).
MAX_WAIT_S = 1e6


def _receive(conn) -> dict[str, Any] | None:
    try:
        return conn.recv()
    except (EOFError, OSError):  # the child died without sending (or mid-message)
        return None


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``), so a
    killed manager leaves no worker behind; exit at once if the parent is already gone."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os._exit(1)


class Launcher(Protocol):
    name: str

    def launch(self, task: Task, limit_s: float, memory_limit_bytes: int | None = None) -> Outcome:
        """Run ``task`` in a fresh process; kill it after ``limit_s`` seconds; cap its
        extra memory at ``memory_limit_bytes``. A result that arrives is never dropped."""


def _limit_text(limit_s: float) -> str:
    return f"{limit_s:.3g} s"


def exit_cause(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    return f"exit code {code}"


@dataclass
class ForkServerLauncher:
    """Fork each worker from a fork server that preloaded torch (CPU only)."""

    #: what the forked worker runs (a module-level function or a partial of one: it is
    #: pickled to the fork server); tests substitute one that crashes or hangs
    worker_fn: Callable[[Task], dict[str, Any]]
    decode: Decode = dict
    name: str = "forkserver"

    def launch(self, task: Task, limit_s: float, memory_limit_bytes: int | None = None) -> Outcome:
        from multiprocessing.connection import wait

        ctx = _fork_server()
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_fork_entry, args=(self.worker_fn, task, send, memory_limit_bytes), daemon=True)
        with forked_child_context(self.worker_fn):
            proc.start()
        send.close()
        message = None
        try:
            ready = wait([receive, proc.sentinel], timeout=min(limit_s, MAX_WAIT_S))
            if receive in ready or receive.poll(0):
                message = _receive(receive)
            proc.join(timeout=5 if message is not None else (0.5 if ready else 0))
            if proc.is_alive():
                proc.kill()
                proc.join()
                if message is None and receive.poll(0):  # it finished as the limit ran out: keep it
                    message = _receive(receive)
                if message is None:
                    return Outcome(TIMEOUT, reason=f"worker exceeded the {_limit_text(limit_s)} limit and was killed")
        except BaseException:  # Ctrl-C or an error in the manager: the worker must not outlive it
            if proc.is_alive():
                proc.kill()
                proc.join()
            raise
        finally:
            receive.close()
        if message is None:
            return Outcome(CRASHED, reason=exit_cause(proc.exitcode))
        return _from_message(message, self.decode)


@dataclass
class SpawnLauncher:
    """Spawn ``worker_cmd`` (``[python, -m, <worker module>, ...]``) per task."""

    worker_cmd: list[str]
    decode: Decode = dict
    name: str = "spawn"

    def launch(self, task: Task, limit_s: float, memory_limit_bytes: int | None = None) -> Outcome:
        env = child_env({**WORKER_ENV, MEMORY_LIMIT_ENV: str(int(memory_limit_bytes or 0))})
        with subprocess.Popen(self.worker_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, preexec_fn=die_with_parent) as proc:
            try:
                stdout, stderr = proc.communicate(json.dumps(task.to_dict()), timeout=min(limit_s, MAX_WAIT_S))
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
                result = _result_line(stdout)
                if result is None:
                    return Outcome(TIMEOUT, reason=f"worker exceeded the {_limit_text(limit_s)} limit and was killed")
                return _from_message(result, self.decode)  # it finished as the limit ran out: keep it
            except BaseException:  # Ctrl-C or an error in the manager: the worker must not outlive it
                proc.kill()
                raise
        result = _result_line(stdout)
        if result is None:
            tail = " | ".join(stderr.strip().splitlines()[-3:])
            return Outcome(CRASHED if proc.returncode != 0 else FAILED, reason=f"{exit_cause(proc.returncode)}: {tail}")
        return _from_message(result, self.decode)


def _result_line(stdout: str | None) -> dict[str, Any] | None:
    return next((json.loads(line[len(RESULT_PREFIX):]) for line in (stdout or "").splitlines()
                 if line.startswith(RESULT_PREFIX)), None)


def fork_available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def worker_command(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter: a spawned worker's command."""
    return [sys.executable, "-m", module, *args]


def launcher_for(device: str, worker_fn: Callable[[Task], dict[str, Any]], worker_cmd: list[str],
                 decode: Decode = dict, choice: str = "auto") -> "Launcher":
    """The launcher of a benchmark's workers: forked from the fork server on CPU where the
    platform has one (``choice`` "auto"), else spawned (CUDA cannot survive a fork;
    ``choice`` "spawn" always spawns)."""
    if choice not in ("auto", "spawn"):
        raise ValueError(f"launcher must be 'auto' or 'spawn', got {choice!r}")
    if choice == "auto" and device == "cpu" and fork_available():
        return ForkServerLauncher(worker_fn, decode)
    return SpawnLauncher(worker_cmd, decode)


_FORK_SERVER = None


def _fork_server():
    """The forkserver context, its server preloading torch and the worker module.

    The server is started here, with :data:`WORKER_ENV` in its environment (the OpenMP
    runtime reads its settings when torch is loaded, in the server, before any fork) and,
    like every child, with the working folder off its import path (``bench.core.children``:
    the server copies this process's ``sys.path``, cleaned while it starts).
    """
    global _FORK_SERVER
    if _FORK_SERVER is None:
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(_PRELOAD))
        saved_env, saved_path = dict(os.environ), list(sys.path)
        os.environ.clear()
        os.environ.update(child_env(WORKER_ENV, base=saved_env))
        sys.path[:] = import_path(saved_path)
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            sys.path[:] = saved_path
        _FORK_SERVER = ctx
    return _FORK_SERVER


def _fixed_mmap_threshold() -> None:
    """``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` and ``mallopt(M_ARENA_MAX, 1)`` in the forked
    worker, as :data:`WORKER_ENV` does at start-up (a no-op where the server already had
    them, kept for other launchers)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD = -3 (glibc)
        libc.mallopt(-8, 1)  # M_ARENA_MAX = -8
    except (OSError, AttributeError):
        pass


def _exit_with_manager(send) -> None:
    """End this forked worker the moment its manager is gone.

    The worker's parent is the fork server, not the manager, so ``PR_SET_PDEATHSIG`` would
    watch the wrong process (and the server itself waits for its children). Instead a
    daemon thread polls the write end of the result pipe: the kernel reports ``POLLERR``
    on it once every read end is closed, which happens when the manager dies, however it
    dies. The worker also drops its copy of the fork server's liveness pipe, so the
    server sees the manager's death and exits too.
    """
    import select
    import threading

    try:
        from multiprocessing import forkserver

        fd = forkserver._forkserver._forkserver_alive_fd
        if fd is not None:
            os.close(fd)
            forkserver._forkserver._forkserver_alive_fd = None
    except (AttributeError, OSError):
        pass

    def watch() -> None:
        poller = select.poll()
        poller.register(send.fileno(), select.POLLERR)
        while True:
            if poller.poll():
                os._exit(70)  # the manager is gone: nobody will read the result

    threading.Thread(target=watch, name="manager-watch", daemon=True).start()


def _fork_entry(fn: Callable[[Task], dict[str, Any]], task: Task, send, memory_limit_bytes: int | None = None) -> None:
    """Child side of a forked worker: run, send one message, exit without cleanup."""
    import traceback

    _fixed_mmap_threshold()
    try:
        shuffle_layout()  # before any thread and before the memory cap (bench.core.layout)
        _exit_with_manager(send)
        apply_memory_limit(memory_limit_bytes)
        message = fn(task)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a recorded row
        message = failure_message(exc, traceback.format_exc().strip().splitlines()[-3:])
    send.send(message)
    send.close()
    os._exit(0)
