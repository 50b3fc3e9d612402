"""The worker: runs one :class:`bench.tasks.Task` in a fresh process and prints its result.

Invoked by the runner as ``python -m bench.worker`` with the task as JSON on stdin; the
result is one line on stdout prefixed with :data:`RESULT_PREFIX`. Everything the
measurement does not need (the weight, the synthetic statistics, the pristine copy that
restores the weight before each in-place call) is set up before any region is entered.
"""

from __future__ import annotations

import inspect
import json
import statistics
import sys
import time
from typing import Any

import torch

import loram_ref
from loram_ref import LoraDAStats, LoraSBStats, Statistics

from .measure import cpu_peak, gpu_peak, timed
from .tasks import Task

RESULT_PREFIX = "LORAM_BENCH_RESULT "



def _measurement_kwargs(fn) -> dict[str, Any]:
    """How the benchmark calls an initializer.

    ``inplace=True`` where accepted: the residual replaces the base weight, as it does in
    a PEFT model, so the residual is not an extra allocation. ``check_input=False`` where
    accepted: the benchmark times the algorithm; the finiteness pass is the same for every
    method (LoRAM's is fused into its norm pass and has no switch).
    """
    params = inspect.signature(fn).parameters
    return {**({"inplace": True} if "inplace" in params else {}),
            **({"check_input": False} if "check_input" in params else {})}


def _make_weight(task: Task, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(task.seed)
    weight = torch.empty(task.d_out, task.d_in, dtype=getattr(torch, task.dtype), device=device)
    return weight.normal_(0.0, task.d_in**-0.5, generator=gen)  # nn.Linear-like scale


def _make_stats(task: Task, device: torch.device) -> dict[str, Any]:
    kind = loram_ref.get_initializer(task.initializer).statistics
    gen = torch.Generator(device=device).manual_seed(task.seed + 1)
    if kind is Statistics.LORA_SB:
        return {"stats": LoraSBStats.synthetic(task.d_out, task.d_in, gen, device=device)}
    if kind is Statistics.LORA_DA:
        tokens = min(2 * task.d_in, 512)  # a PSD factor of the right shape; the solve cost does not depend on it
        stats = LoraDAStats.synthetic(task.d_out, task.d_in, gen, tokens=tokens, device=device)
        stats.input_factor.diagonal().add_(1e-2)
        return {"stats": stats}
    return {}


def _invariant_error(init: loram_ref.LoraInit, pristine: torch.Tensor) -> dict[str, float]:
    """Step-0 diagnostics (spec §9): reconstruction error and ‖s·B·A‖_F/‖W‖_F."""
    w = pristine.float()
    delta = init.delta()
    out = {"delta_rel_norm": float(delta.norm() / w.norm())}
    if init.residual is not None:
        out["reconstruction_rel_err"] = float((init.residual.float() + delta - w).norm() / w.norm())
    return out


def run_task(task: Task) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(task.threads)
    device = torch.device(task.device)
    if device.type == "cuda":
        torch.cuda.init()
    spec = loram_ref.get_initializer(task.initializer)
    weight = _make_weight(task, device)
    kwargs: dict[str, Any] = {**_make_stats(task, device), **_measurement_kwargs(spec.fn), **task.options}
    pristine = weight.clone() if kwargs.get("inplace") else weight

    def call() -> loram_ref.LoraInit:
        return spec.fn(weight, task.rank, task.scaling, **kwargs)

    def restore() -> None:
        if pristine is not weight:
            weight.copy_(pristine)

    first = timed(call, device)
    restore()
    for _ in range(task.warmups):
        call()
        restore()
    values, events = [], []
    spent = 0.0
    while len(values) < task.values and (len(values) < task.min_values or spent < task.value_budget_s):
        t = timed(call, device)
        restore()
        values.append(t.wall_s)
        spent += t.wall_s
        if t.event_s is not None:
            events.append(t.event_s)

    # Memory pass, apart from timing: the region holds only the initializer call.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with cpu_peak() as cpu, gpu_peak(device) as gpu:
        init = call()
    diagnostics = _invariant_error(init, pristine)
    info = {k: v for k, v in init.info.items() if isinstance(v, (int, float, str, bool))}
    return {
        "status": "ok",
        "first_s": first.wall_s,
        "first_event_s": first.event_s,
        "values_s": values,
        "event_values_s": events,
        "warmups": task.warmups,
        "median_s": statistics.median(values),
        "mean_s": statistics.fmean(values),
        "stdev_s": statistics.stdev(values) if len(values) > 1 else 0.0,
        "peak_cpu_extra_bytes": cpu.extra_bytes,
        "peak_rss_bytes": cpu.peak_bytes,
        "cpu_peak_method": cpu.method,
        "peak_gpu_allocated_bytes": gpu.allocated_bytes,
        "peak_gpu_reserved_bytes": gpu.reserved_bytes,
        "weight_bytes": weight.numel() * weight.element_size(),
        "torch_threads": torch.get_num_threads(),
        "init_info": json.dumps(info, sort_keys=True),
        **diagnostics,
        "worker_wall_s": time.perf_counter() - started,
    }


def main() -> int:
    task = Task.from_dict(json.loads(sys.stdin.read()))
    result = run_task(task)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
