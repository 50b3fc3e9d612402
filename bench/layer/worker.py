"""The layer-loss worker: one :class:`bench.layer.task.LayerTask` in a fresh process.

Setup builds the problem's small parts and the target (O((m+n)·k)); the init phase
loads the group's factors from the cache, or builds W, collects statistics from the
task's gradients, calls the initializer (timed, peak memory measured) and caches the
factors; the training phase runs :func:`bench.layer.factored.train_layer`. The message
sent back holds the measured fields of the run's row; the driver adds its identity.
Invoked like the init worker: forked from the fork server, or ``python -m bench.layer.worker``
with the task as JSON on stdin.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import loram_ref
from bench.core.environment import loram_ref_fingerprint, worker_environment
from bench.core.measure import cpu_peak, gpu_peak
from bench.core.protocol import PHASE, begin_setup, serve
from bench.layer.factored import AdapterState, gram_norm_sq, train_layer
from bench.layer.problem import LayerProblem, Target, stable_seed
from bench.layer.task import LayerTask
from loram_ref import CollectContext, Invariant, LoraInit

#: Threads of the training phase. A step is a handful of GEMMs with c = 2r + k <= 40 columns,
#: where waking the workers' passive OpenMP pool costs more than a second core gives
#: (measured per step: 1.9 ms on one thread and 2.9 ms on two at 4096x4096; 7.0 and 8.7 ms at
#: 28672x8192). The init phase uses the task's threads.
TRAIN_THREADS = 1

#: Inputs the residual probe multiplies by: ``‖(W_res − W + s·P₀·A₀)·X‖ / ‖ΔW*·X‖``.
PROBE_INPUTS = 4


def statistics_samples(task: LayerTask, kind: loram_ref.StatisticsKind) -> int:
    """How many inputs a statistics pass of ``kind`` reads (``--sb-samples``; LoRA-DA's tokens, 2·n by default)."""
    return {loram_ref.Statistics.LORA_SB: task.sb_samples,
            loram_ref.Statistics.LORA_DA: task.da_tokens or 2 * task.d_in}.get(kind, kind.default_samples)


def _init_kwargs(spec: loram_ref.InitializerSpec, task: LayerTask, device: torch.device) -> dict[str, Any]:
    """The run's seed as a generator where the method draws; no separate finiteness pass
    (the benchmark's convention: the weight is finite by construction)."""
    generator = (torch.Generator(device=device).manual_seed(stable_seed("init", task.seed, task.initializer))
                 if "generator" in spec.harness else None)
    return {**task.options, **spec.harness_kwargs(generator=generator, check_input=False)}


def _residual_probe(init: LoraInit, weight: torch.Tensor, target: Target, gen: torch.Generator) -> float:
    """How far the returned residual is from the factored model ``W_res = W − s·P₀·A₀``
    the training uses, relative to the target: ``‖(W_res − W + s·P₀·A₀)·X‖ / ‖ΔW*·X‖`` on
    random inputs. O(m·n) per input; the m x n difference is never formed."""
    x = torch.randn(weight.shape[1], PROBE_INPUTS, generator=gen, device=weight.device)
    p0 = init.B.float() @ init.R.float() if init.R is not None else init.B.float()
    gap = init.residual.float() @ x - weight @ x + init.scaling * (p0 @ (init.A.float() @ x))
    return float(gap.norm() / (target.left @ (target.right.mT @ x)).norm())


def compute_init(task: LayerTask, problem: LayerProblem, target: Target) -> tuple[LoraInit, dict[str, Any]]:
    """Run the initializer on the task's W (or take PiSSA's factors from the known SVD)."""
    spec = loram_ref.get_initializer(task.initializer)
    device = problem.device
    facts: dict[str, Any] = {"init_method": task.init_method, "init_seconds": None, "stats_seconds": 0.0,
                             "init_peak_cpu_extra_bytes": None, "init_peak_gpu_allocated_bytes": None,
                             "residual_probe_rel_err": None}
    if task.init_method == "known-svd":
        if spec.from_svd is None:
            raise ValueError(f"{task.initializer} cannot be taken from a known SVD (no from_svd on its spec)")
        init = spec.from_svd(*problem.top_triplets(task.rank), task.scaling)
        facts["step0_delta_rel_norm"] = _delta_norm(init) / problem.weight_norm
        return init, facts
    kwargs = _init_kwargs(spec, task, device)
    if spec.needs_statistics:
        kind = spec.statistics
        if kind.from_oracle is None:
            raise ValueError(f"{task.initializer}'s statistics ({kind.name}) cannot come from a layer task (no from_oracle)")
        ctx = CollectContext(batch_size=task.batch_size, lr=task.collected_lr, num_train=task.steps * task.batch_size,
                             warmup_ratio=task.sb_warmup_ratio)
        t0 = time.perf_counter()
        stats, meta = kind.from_oracle(problem.oracle(target, task.exact), ctx, statistics_samples(task, kind))
        facts["stats_seconds"] = time.perf_counter() - t0
        facts.update({f"stats_{k}": v for k, v in meta.items() if isinstance(v, (int, float))})
        kwargs["stats"] = stats
    weight = problem.weight() if spec.reads_weight else torch.empty(task.d_out, task.d_in, device=device)
    with cpu_peak() as cpu, gpu_peak(device) as gpu:
        t0 = time.perf_counter()
        init = spec.fn(weight, task.rank, task.scaling, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        facts["init_seconds"] = time.perf_counter() - t0
    facts["init_peak_cpu_extra_bytes"] = cpu.extra_bytes
    facts["init_peak_gpu_allocated_bytes"] = gpu.allocated_bytes if device.type == "cuda" else None
    w_norm = float(torch.linalg.vector_norm(weight)) if spec.reads_weight else problem.weight_norm
    facts["step0_delta_rel_norm"] = _delta_norm(init) / w_norm
    if init.residual is not None:
        facts["residual_probe_rel_err"] = _residual_probe(init, weight, target, problem.generator("probe"))
    init.residual = None  # the factored model replaces it (checked by the probe)
    return init, facts


def _delta_norm(init: LoraInit) -> float:
    """``‖s·B·(R)·A‖_F`` from the factors."""
    p = init.B.double() @ init.R.double() if init.R is not None else init.B.double()
    return init.scaling * math.sqrt(max(0.0, float(gram_norm_sq(p, init.A.double().mT))))


def cache_path(task: LayerTask, code: str) -> Path | None:
    """The group's cache file: its key and the fingerprint ``code`` of the ``loram_ref``
    that computed it, so factors of other initializer code are never reused."""
    return Path(task.cache_dir) / f"{task.group_key}-{code}.pt" if task.cache_dir else None


def cached_init(task: LayerTask, problem: LayerProblem, target: Target) -> tuple[LoraInit, dict[str, Any]]:
    """The group's factors from the cache (``init_cached`` true), or computed and cached."""
    path = cache_path(task, loram_ref_fingerprint())
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, map_location=problem.device, weights_only=True)
            init = LoraInit(method=task.initializer, A=saved["A"], B=saved["B"], scaling=saved["scaling"],
                            R=saved.get("R"), info=json.loads(saved["info"]))
            return init, {**json.loads(saved["facts"]), "init_cached": True}
        except (OSError, RuntimeError, KeyError, ValueError, EOFError):
            pass  # a damaged cache file is recomputed
    init, facts = compute_init(task, problem, target)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        info = {k: v for k, v in init.info.items() if isinstance(v, (int, float, str, bool))}
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save({"A": init.A, "B": init.B, "R": init.R, "scaling": init.scaling, "info": json.dumps(info),
                            "facts": json.dumps(facts)}, fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return init, {**facts, "init_cached": False}


def run_layer_task(task: LayerTask) -> dict[str, Any]:
    """One run in this process: the measured fields of its row."""
    started = time.perf_counter()
    device = begin_setup(task.threads, task.device)
    spec = loram_ref.get_initializer(task.initializer)
    problem = LayerProblem(task.d_out, task.d_in, task.seed, task.problem_spec, device)
    target = problem.target(task.alignment)
    PHASE["now"] = "initializer"
    init, facts = cached_init(task, problem, target)
    factor = task.lr / task.collected_lr
    facts["stats_derived"] = spec.needs_statistics and factor != 1.0
    if facts["stats_derived"]:
        init = spec.rescale(init, factor)  # group_key shares one call only where rescale exists
        if "stats_eta_eff" in facts:
            facts["stats_eta_eff"] *= factor
    info = {k: v for k, v in init.info.items() if isinstance(v, (int, float, str, bool))}
    PHASE["now"] = "training"
    torch.set_num_threads(TRAIN_THREADS)
    state = AdapterState(init.A.to(device), init.B.to(device), init.scaling,
                         preserves_function=spec.invariant != Invariant.SHIFTED,
                         middle=init.R.to(device) if init.R is not None else None)
    with cpu_peak() as cpu, gpu_peak(device) as gpu:
        t0 = time.perf_counter()
        curve = train_layer(state, target, problem.input_var.to(device), steps=task.steps, lr=task.lr,
                            batch_size=0 if task.exact else task.batch_size, generator=problem.generator("batches"),
                            sample=problem.inputs)
        train_seconds = time.perf_counter() - t0
    steps_s = sorted(curve.step_seconds)
    ok = not curve.diverged_step
    return {
        **facts,
        "init_info": json.dumps(info, sort_keys=True),
        "trainable_params": state.trainable,
        "loss_floor": problem.loss_floor(target, task.rank),
        "edge": problem.edge,
        "weight_norm_expected": problem.weight_norm,
        "target_norm": float(target.left.norm()),
        "step0_loss": curve.loss[0],
        "loss": curve.loss,
        "update_norm": curve.update_norm,
        "train_loss": curve.train_loss if not task.exact else [],
        "diverged_step": curve.diverged_step,
        "final_loss": curve.loss[-1] if ok else math.nan,
        "auc": curve.auc(),
        "final_update_norm": curve.update_norm[-1] if ok else math.nan,
        "median_step_s": steps_s[len(steps_s) // 2] if steps_s else None,
        "train_seconds": train_seconds,
        "train_threads": TRAIN_THREADS,
        "train_peak_cpu_extra_bytes": cpu.extra_bytes,
        "train_peak_gpu_allocated_bytes": gpu.allocated_bytes if device.type == "cuda" else None,
        "worker_wall_s": time.perf_counter() - started,
        "worker_environment": worker_environment(cpu.method),
    }


def main() -> int:
    return serve(LayerTask.from_dict, run_layer_task)


if __name__ == "__main__":
    raise SystemExit(main())
