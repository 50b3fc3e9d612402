"""Worker bodies the tests hand to the launchers (each runs in a forked worker process).

They live in this light module, not in the test files: a forked worker imports the module
of its function, and a test file imports pytest and the whole harness (about 2 s per
worker); this one imports only what the fork server has already loaded.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from bench.initcost.tasks import Task


# -- init-cost workers (bench.initcost.runner), each returning a ProcessRun-like dict --------------

def ok(task: Task) -> dict:
    return {"task_key": task.key, "status": "ok", "first_s": 0.01, "median_s": 0.01 * task.d_out / 64,
            "values_s": [0.01 * task.d_out / 16]}


def crash_at_32(task: Task) -> dict:
    if task.d_out == 32:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return ok(task)


def hang_at_32(task: Task) -> dict:
    if task.d_out == 32:
        time.sleep(60)
    return ok(task)


def raise_at_32(task: Task) -> dict:
    if task.d_out == 32:
        raise RuntimeError("CUDA out of memory (simulated)")
    return ok(task)


def _log(task: Task, text: str) -> None:
    with open(task.options["log"], "a") as fh:  # a worker reports through a file
        fh.write(f"{text}\n")


def counting(task: Task) -> dict:
    _log(task, str(task.d_out))
    return ok(task)


def log_a(task: Task) -> dict:
    _log(task, f"A{task.d_out}")
    return ok(task)


def log_b(task: Task) -> dict:
    _log(task, f"B{task.d_out}")
    return ok(task)


def slow(task: Task) -> dict:
    """One second per call at 16x16, growing with (d_out / 16)²: predictions skip large shapes."""
    return {"task_key": task.key, "status": "ok", "first_s": 1.0, "median_s": 1.0 * (task.d_out / 16) ** 2,
            "values_s": [1.0 * (task.d_out / 16) ** 2]}


def sleepy(task: Task) -> dict:
    time.sleep(task.options["sleep"])
    return ok(task)


def hang_and_tell(task: Task) -> dict:
    Path(task.options["pid_file"]).write_text(str(os.getpid()))
    time.sleep(300)
    return ok(task)


def oom_in_initializer(task: Task) -> dict:
    import torch

    from bench.initcost.worker import PHASE

    PHASE["now"] = "initializer"
    torch.empty(task.options["bytes"], dtype=torch.uint8).fill_(1)
    return ok(task)


def fake_run(task: Task) -> dict:
    from bench.initcost.schema import ProcessRun

    return ProcessRun(task_key=task.key, first_s=0.5, values_s=[0.1, 0.2], peak_cpu_extra_bytes=100).as_dict()


# -- layer-loss workers (bench.layer.run) --------------------------------------------------

def layer_crash_on_seed_one(task) -> dict:
    from bench.layer.worker import run_layer_task

    if task.seed == 1 and task.lr == 1e-2 and task.initializer == "loram_dst":
        os._exit(3)  # a crash during training: the worker dies without a message
    return run_layer_task(task)


def layer_init_fails(task) -> dict:
    from bench.layer.worker import run_layer_task
    from bench.initcost.worker import PHASE

    PHASE["now"] = "initializer"
    with open(Path(task.cache_dir).parent / "launches.log", "a") as fh:
        fh.write(f"{task.initializer} {task.seed} {task.lr}\n")
    if task.initializer == "loram_dst":
        raise RuntimeError("boom in the initializer")
    return run_layer_task(task)


# -- the layout test (bench.core.layout) ---------------------------------------------------------

#: Float counts of the tensors ``addresses`` allocates: heap chunks (64 B to 64 KiB) and
#: mappings (256 KiB to 64 MiB).
SIZES = [16, 64, 256, 1024, 8192, 1 << 14, 1 << 16, 1 << 20, 1 << 24]


def addresses(task) -> dict:
    """The setup every real worker makes, then tensors of every size, in this thread and
    (one more of each size) after an OpenMP parallel region started the thread pool."""
    import torch

    from bench.initcost.worker import begin_setup

    begin_setup(2, "cpu")
    main = [torch.empty(n) for n in SIZES]
    torch.ones(1 << 20).sum()  # starts the OpenMP pool: its threads could allocate arenas of their own
    after_pool = [torch.empty(n) for n in SIZES]
    return {"main": [t.data_ptr() for t in main], "after_pool": [t.data_ptr() for t in after_pool]}
