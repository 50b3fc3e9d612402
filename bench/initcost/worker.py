"""The worker: runs one :class:`bench.initcost.tasks.Task` in a fresh process and reports one
:class:`bench.initcost.schema.ProcessRun` (raw values and peaks; statistics are derived by the
manager, ``bench.initcost.metrics.derive``).

Invoked by a launcher (``bench.core.launchers``): forked from the fork server with
:func:`run_task` as the target, or spawned as ``python -m bench.initcost.worker`` with the task as
JSON on stdin and the result as one line on stdout prefixed with :data:`RESULT_PREFIX`.
Everything the measurement does not need (the weight, the synthetic statistics, the
pristine copy that restores the weight before each in-place call) is set up before any
region is entered. Every timed call after the cold one and the warm-ups is also a memory
region (the peak reset at its entry, read at its exit, both outside the timed span): the
peaks are the largest over those calls, and no extra call is made only for memory.
"""

from __future__ import annotations

import inspect
import json
import time
from typing import Any

import torch

import loram_ref
from bench.core.environment import worker_environment
from bench.core.measure import CpuPeak, GpuPeak, cpu_peak, gpu_peak, timed
from bench.core.protocol import PHASE, begin_setup, is_out_of_memory, serve
from bench.core.weights import make_weight
from bench.initcost.schema import ProcessRun
from bench.initcost.tasks import Task
from loram_ref.linalg import gram_norm_sq


def measurement_kwargs(spec: loram_ref.InitializerSpec) -> dict[str, Any]:
    """How the benchmark calls an initializer (the roles its registry entry declares).

    ``inplace=True`` where declared: the residual replaces the base weight, as it does in
    a PEFT model, so the residual is not an extra allocation. ``check_input=False`` where
    declared: the benchmark times the algorithm; the finiteness pass is the same for every
    method (LoRAM's is fused into its norm pass and has no switch). A ``loram_ref`` from
    before roles were declared (the gate's base tree may be one) has them read from its
    function's keywords.
    """
    if hasattr(spec, "harness_kwargs"):
        return spec.harness_kwargs(inplace=True, check_input=False)
    params = inspect.signature(spec.fn).parameters
    return {**({"inplace": True} if "inplace" in params else {}),
            **({"check_input": False} if "check_input" in params else {})}


def _make_weight(task: Task, device: torch.device) -> torch.Tensor:
    """The cell's W: ``N(0, 1/d_in)`` entries (nn.Linear's scale), or the spiked spectrum
    (``bench.core.weights``), from the task's seed."""
    return make_weight(task.d_out, task.d_in, task.seed, task.spectrum, getattr(torch, task.dtype), device)


def _make_stats(spec: loram_ref.InitializerSpec, task: Task, device: torch.device) -> dict[str, Any]:
    """Synthetic statistics of the right shapes, by the initializer's statistics kind."""
    if not spec.needs_statistics:
        return {}
    gen = torch.Generator(device=device).manual_seed(task.seed + 1)
    return {"stats": spec.statistics.synthetic(task.d_out, task.d_in, gen, device)}


#: Elements per block of the diagnostics: 4 MiB of fp32.
_BLOCK_ELEMENTS = 1 << 20


def _row_blocks(m: int, n: int):
    step = max(1, _BLOCK_ELEMENTS // max(1, n))
    return ((i, min(m, i + step)) for i in range(0, m, step))


def _invariant_error(init: loram_ref.LoraInit, pristine: torch.Tensor) -> dict[str, float]:
    """Step-0 diagnostics (docs/initializers.md §9): ``‖W_res + s·B·A − W‖_F / ‖W‖_F`` and ``‖s·B·A‖_F / ‖W‖_F``.

    Never an m x n product: ``‖s·B·A‖_F² = s²·Σ (BᵀB) ∘ (AAᵀ)`` costs O((m+n)·r²), and the
    reconstruction error and ``‖W‖_F`` are summed over row blocks of at most
    :data:`_BLOCK_ELEMENTS` fp32 elements.
    """
    b = init.B.double()
    if init.R is not None:
        b = b @ init.R.double()
    a = init.A.double()
    s = float(init.scaling)
    delta_sq = s * s * float(gram_norm_sq(b, a.mT).clamp(min=0.0))
    m, n = pristine.shape
    w_sq = err_sq = 0.0
    b32, a32 = b.float(), a.float()
    for i, j in _row_blocks(m, n):
        w = pristine[i:j].float()
        w_sq += float(torch.linalg.vector_norm(w)) ** 2
        if init.residual is not None:
            block = torch.addmm(init.residual[i:j].float(), b32[i:j], a32, alpha=s).sub_(w)
            err_sq += float(torch.linalg.vector_norm(block)) ** 2
            del block
    w_norm = w_sq ** 0.5
    out = {"delta_rel_norm": (delta_sq ** 0.5) / w_norm if w_norm else float("nan")}
    if init.residual is not None:
        out["reconstruction_rel_err"] = (err_sq ** 0.5) / w_norm if w_norm else float("nan")
    return out


def _larger(kept, new):
    """The larger of two regions' peaks: CPU, the region with more RSS above its entry;
    CUDA, the larger allocated and the larger reserved bytes."""
    if isinstance(new, CpuPeak):
        return new if not kept.method or new.extra_bytes > kept.extra_bytes else kept
    return GpuPeak(max(kept.allocated_bytes, new.allocated_bytes), max(kept.reserved_bytes, new.reserved_bytes))


def run_task(task: Task) -> dict[str, Any]:
    """Measure ``task`` in this process; the :class:`ProcessRun` as a dict.

    The phase is kept in :data:`PHASE` so that a failure names where it happened. A
    failure of the diagnostics does not cost the timings: the run is returned with
    ``diagnostics_error`` set.
    """
    import loram_ref  # the one imported now: a comparison's worker has swapped in its tree's (bench.gate.trees)

    started = time.perf_counter()
    device = begin_setup(task.threads, task.device)
    spec = loram_ref.get_initializer(task.initializer)
    weight = _make_weight(task, device)
    kwargs: dict[str, Any] = {**_make_stats(spec, task, device), **measurement_kwargs(spec), **task.options}
    pristine = weight.clone() if kwargs.get("inplace") else weight

    result: list[loram_ref.LoraInit] = []  # the latest call's result (the diagnostics read the last one)

    def call() -> None:
        result[:] = [spec.fn(weight, task.rank, task.scaling, **kwargs)]

    def restore() -> None:
        """Before each call after the first: the previous result freed, W as it was."""
        result.clear()
        if pristine is not weight:
            weight.copy_(pristine)

    PHASE["now"] = "initializer"
    first = timed(call, device)
    for _ in range(task.warmups):
        restore()
        call()
    # Each timed call is also a memory region: the kernel's peak RSS (and the CUDA allocator's
    # peak) reset at its entry, read at its exit, outside the timed span; the row keeps the
    # largest over the timed calls. The last call's result stays for the diagnostics.
    values, events = [], []
    cpu, gpu = CpuPeak(), GpuPeak()
    spent = 0.0
    while not values or (len(values) < task.values and (len(values) < task.min_values or spent < task.value_budget_s)):
        restore()
        with cpu_peak() as region, gpu_peak(device) as gpu_region:
            t = timed(call, device)
        cpu, gpu = _larger(cpu, region), _larger(gpu, gpu_region)
        values.append(t.wall_s)
        spent += t.wall_s
        if t.event_s is not None:
            events.append(t.event_s)
    init = result[0]
    PHASE["now"] = "diagnostics"
    diagnostics: dict[str, Any] = {}
    try:
        diagnostics = _invariant_error(init, pristine)
        if spec.fidelity is not None and 0 < task.d_out * task.d_in <= task.max_fidelity_elements:
            diagnostics["fidelity"] = spec.fidelity(pristine, task.rank, init, kwargs)
    except Exception as exc:  # noqa: BLE001 - the harness's check must not cost the measurement
        diagnostics = {**{k: v for k, v in diagnostics.items() if k != "fidelity"},
                       "diagnostics_error": ("out of memory: " if is_out_of_memory(exc) else "")
                       + f"{type(exc).__name__}: {str(exc)[:300]}"}
    info = {k: v for k, v in init.info.items() if isinstance(v, (int, float, str, bool))}
    run = ProcessRun(
        task_key=task.key,
        first_s=first.wall_s,
        first_event_s=first.event_s,
        values_s=values,
        event_values_s=events,
        warmups=task.warmups,
        peak_cpu_extra_bytes=cpu.extra_bytes,
        peak_rss_bytes=cpu.peak_bytes,
        peak_gpu_allocated_bytes=gpu.allocated_bytes,
        peak_gpu_reserved_bytes=gpu.reserved_bytes,
        init_info=json.dumps(info, sort_keys=True),
        environment=worker_environment(cpu.method),
        **diagnostics,
    )
    run.worker_wall_s = time.perf_counter() - started
    return run.as_dict()


def main() -> int:
    return serve(Task.from_dict, run_task)


if __name__ == "__main__":
    raise SystemExit(main())
