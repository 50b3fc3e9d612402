"""One rank of a sharded launch: ``torchrun ... -m bench.sharded.worker PLAN_JSON``.

The plan lists the tasks of this launch (one world size, one device), the results file and
a progress folder. Per task, every rank builds its own shard of the benchmark weight
(``bench.sharded.weights``), wraps it as a DTensor, and then:

1. the cold call, each rank's peak memory measured around it (``bench.core.measure``);
2. ``repeats`` timed calls, each started at a barrier, the shard restored before each;
3. the check: the result gathered, rank 0 runs the single-process initializer on the whole
   weight and records the largest differences.

Rank 0 appends the row to the results file. Each rank appends events (start, measure,
failed) to its own progress file, which the launcher reads to know which task a dead or
hung launch was on. A rank that fails writes why and exits at once; ``torchrun`` then
ends the others (which would wait forever in their next collective).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import loram_ref
from bench.core.measure import cpu_peak, gpu_peak
from bench.core.protocol import failure_message
from bench.core.results import append_row
from bench.core.rows import OK
from bench.core.torchrun import close, leave
from bench.sharded.plugins import load_plugins
from bench.sharded.tasks import ShardedRow, ShardedTask
from bench.sharded.weights import full_weight, weight_block
from loram_ref.sharded import SHARDED, Collectives, Layout, Ledger

PHASE = {"now": "setup"}

#: What a collective raises on a rank whose peer died: the cause is elsewhere (the launcher
#: then reports the rank that died, from torchrun's exit codes, not this echo).
PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|remote process exited|"
                       r"communicator was aborted|Socket closed|Timed out waiting", re.IGNORECASE)


def _event(progress: Path, **fields: Any) -> None:
    append_row(progress, {"time": time.time(), "pid": os.getpid(), **fields})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kwargs(fn, task: ShardedTask) -> dict[str, Any]:
    """In place where accepted (the residual replaces the weight, as in a model), no separate
    finiteness scan (the same policy as the init worker), the task's seed."""
    params = inspect.signature(fn).parameters
    return {**({"inplace": True} if "inplace" in params else {}),
            **({"check_input": False} if "check_input" in params else {}),
            **({"seed": task.seed} if "seed" in params else {})}


def _diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got − ref| / max|ref|`` (absolute where ``ref`` is all zeros), in float64."""
    got, ref = got.double(), ref.double()
    scale = float(ref.abs().max())
    err = float((got - ref).abs().max())
    return err / scale if scale > 0 else err


def differences(got: loram_ref.LoraInit, ref: loram_ref.LoraInit, sign_free: bool) -> dict[str, float]:
    """Largest relative differences of ``A``, ``B`` and the residual from the reference;
    with ``sign_free``, each triplet's sign is first aligned with the reference's."""
    a, b = got.A.double(), got.B.double()
    if sign_free:
        signs = torch.sign((b * ref.B.double()).sum(dim=0))
        signs[signs == 0] = 1
        a, b = a * signs[:, None], b * signs
    out = {"A": _diff(a, ref.A), "B": _diff(b, ref.B)}
    if ref.residual is not None and got.residual is not None:
        out["residual"] = _diff(got.residual, ref.residual)
    return out


class Rank:
    """This process's place in the launch: its rank, the mesh, its device."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.index = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        device = plan["device"]
        if device.startswith("cuda"):
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        dist.init_process_group(backend, device_id=self.device if backend == "nccl" else None)
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        self.group = self.mesh.get_group()
        self.progress = Path(plan["progress_dir"]) / f"rank{self.index}.jsonl"
        self._reference: tuple[tuple, loram_ref.LoraInit] | None = None

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (uncounted: the harness's own traffic, not the method's)."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out

    def reference(self, task: ShardedTask, spec_name: str) -> loram_ref.LoraInit:
        """The single-process result on the whole weight (cached across placements)."""
        key = (spec_name, task.d_out, task.d_in, task.rank, task.scaling, task.dtype, task.seed)
        if self._reference is None or self._reference[0] != key:
            self._reference = None
            weight = full_weight(task.d_out, task.d_in, task.rank, task.seed, getattr(torch, task.dtype), self.device)
            fn = loram_ref.INITIALIZERS[spec_name].fn
            self._reference = (key, fn(weight, task.rank, task.scaling, **_kwargs(fn, task)))
        return self._reference[1]

    def measure(self, task: ShardedTask) -> ShardedRow | None:
        PHASE["now"] = "setup"
        _event(self.progress, event="start", task_key=task.key)
        torch.set_num_threads(task.threads)
        spec = SHARDED[task.initializer]
        dtype = getattr(torch, task.dtype)
        m, n = task.d_out, task.d_in
        lay = Layout(shape=(m, n), dim=task.dim, world=self.world, index=self.index)
        rows = (lay.start, lay.stop) if lay.dim == 0 else (0, m)
        cols = (lay.start, lay.stop) if lay.dim == 1 else (0, n)
        local = weight_block(m, n, task.rank, task.seed, rows, cols, dtype, self.device)
        pristine = local.clone()
        weight = DTensor.from_local(local, self.mesh, [Shard(lay.dim)], run_check=False, shape=torch.Size((m, n)),
                                    stride=(n, 1))
        kwargs = _kwargs(spec.fn, task)

        def call(ledger: Ledger):
            local.copy_(pristine)
            comm = Collectives(self.group, ledger)
            dist.barrier(group=self.group)
            _sync(self.device)
            start = time.perf_counter()
            result = spec.fn(weight, task.rank, task.scaling, comm=comm, **kwargs)
            _sync(self.device)
            return result, time.perf_counter() - start

        PHASE["now"] = "initializer"
        ledger = Ledger()
        local.copy_(pristine)
        dist.barrier(group=self.group)
        with cpu_peak() as cpu, gpu_peak(self.device) as gpu:
            _event(self.progress, event="measure", task_key=task.key, entry_rss=cpu.entry_bytes)
            result, first = call(ledger)
        times = []
        for _ in range(task.repeats):
            result, seconds = call(Ledger())
            times.append(seconds)
        mine = {"first": first, "times": times, "cpu_extra": cpu.extra_bytes, "rss": cpu.peak_bytes,
                "gpu": gpu.allocated_bytes if self.device.type == "cuda" else None, "sent": ledger.bytes_sent,
                "calls": ledger.calls, "local_bytes": local.numel() * local.element_size(),
                "threads": torch.get_num_threads(), "cpu_peak_method": cpu.method}
        everyone = self.gather(mine)
        diffs: dict[str, float] = {}
        if task.check:
            PHASE["now"] = "check"
            gathered = result.full()
            if self.index == 0:
                diffs = differences(gathered, self.reference(task, task.initializer), spec.sign_free)
            del gathered
        del result
        if self.index != 0:
            return None
        return ShardedRow(
            task=task, status=OK, first_s=max(r["first"] for r in everyone),
            values_s=[max(r["times"][i] for r in everyone) for i in range(task.repeats)],
            rank_values_s=[r["times"] for r in everyone],
            peak_cpu_extra_bytes=[r["cpu_extra"] for r in everyone], peak_rss_bytes=[r["rss"] for r in everyone],
            peak_gpu_allocated_bytes=[r["gpu"] for r in everyone], bytes_sent=[r["sent"] for r in everyone],
            collectives=everyone[0]["calls"], local_weight_bytes=[r["local_bytes"] for r in everyone], diffs=diffs,
            tolerance=spec.tolerance.get(dtype), limit_s=self.plan.get("limit_s"), run_id=self.plan.get("run_id", ""),
            environment={**self.plan.get("environment", {}), "torch_threads": everyone[0]["threads"],
                         "cpu_peak_method": everyone[0]["cpu_peak_method"],
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")},
        )


def main(argv: list[str]) -> int:
    plan = json.loads(Path(argv[0]).read_text())
    load_plugins()
    me = Rank(plan)
    for data in plan["tasks"]:
        task = ShardedTask.from_dict(data)
        try:
            row = me.measure(task)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes that task's row, never the run's end
            message = failure_message(exc, traceback.format_exc().strip().splitlines()[-3:])
            message["phase"] = PHASE["now"]
            message["reason"] = f"rank {me.index}: {message['reason']}"
            _event(me.progress, event="failed", task_key=task.key, peer_lost=bool(PEER_LOST.search(str(exc))), **message)
            leave(1)
        if row is not None:
            append_row(Path(plan["results"]), row.to_row())
    close(me.group)
    return 0


if __name__ == "__main__":
    leave(main(sys.argv[1:]))
