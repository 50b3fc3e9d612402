"""The layer-loss worker: a :class:`LayerBatch` of runs of one layer shape and seed in a fresh process.

Per run, setup builds the problem's small parts and the target (O((m+n)·k)); the init
phase takes the group's factors from this process's memory or the cache file, or builds W
(once per batch), collects statistics from the task's gradients, calls the initializer
(timed, peak memory measured) and caches the factors; the training phase runs
:func:`bench.layer.factored.train_layer`. Each finished run's measured fields go to the
batch's spool file as one JSON line the moment it ends, so a crash or a kill costs the run in
progress only (the driver reads the spool and runs the rest again); an exception in a run is
that run's failure, and the batch goes on. Invoked like the init worker: forked from the
fork server, or ``python -m bench.layer.worker`` with the batch as JSON on stdin.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import loram_ref
from bench.core.environment import loram_ref_fingerprint, worker_environment
from bench.core.layout import reusable_heap
from bench.core.measure import cpu_peak, gpu_peak
from bench.core.protocol import PHASE, begin_setup, failure_message, serve
from bench.core.weights import stable_seed
from bench.layer.factored import AdapterState, gram_norm_sq, train_layer
from bench.layer.floors import capacity_floor, progress_fraction, rank_floor
from bench.layer.problem import LayerProblem, Target
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


def compute_init(task: LayerTask, problem: LayerProblem, target: Target, weight: torch.Tensor | None = None
                 ) -> tuple[LoraInit, dict[str, Any]]:
    """Run the initializer on the task's W (or take PiSSA's factors from the known SVD).
    ``weight``: the problem's W, when the caller holds one (an in-place method gets a copy)."""
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
    if not spec.reads_weight:
        weight = torch.empty(task.d_out, task.d_in, device=device)
    elif weight is None:
        weight = problem.weight()  # (no in-place call: the harness passes no inplace, so W stays pristine)
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


def cached_init(task: LayerTask, problem: LayerProblem, target: Target, weight: torch.Tensor | None = None
                ) -> tuple[LoraInit, dict[str, Any]]:
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
    init, facts = compute_init(task, problem, target, weight)
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


class BatchContext:
    """What the runs of one batch share: the problem of the shape and seed, its W (built on
    first use), its targets, and the factors of each initializer group."""

    def __init__(self) -> None:
        self.problems: dict[tuple[Any, ...], LayerProblem] = {}
        self.weights: dict[tuple[Any, ...], torch.Tensor] = {}
        self.inits: dict[str, tuple[LoraInit, dict[str, Any]]] = {}

    def problem(self, task: LayerTask, device: torch.device) -> LayerProblem:
        spec = task.problem_spec
        key = (task.d_out, task.d_in, task.seed, tuple(sorted(spec.__dict__.items())), str(device))
        if key not in self.problems:
            self.problems[key] = LayerProblem(task.d_out, task.d_in, task.seed, spec, device)
        return self.problems[key]

    def weight(self, task: LayerTask, problem: LayerProblem) -> torch.Tensor:
        key = (task.d_out, task.d_in, tuple(sorted(task.problem_spec.weight_part().items())), str(problem.device))
        if key not in self.weights:
            self.weights.clear()  # one W in memory at a time
            self.weights[key] = problem.weight()
        return self.weights[key]

    def init(self, task: LayerTask, problem: LayerProblem, target: Target) -> tuple[LoraInit, dict[str, Any]]:
        if task.group_key in self.inits:
            init, facts = self.inits[task.group_key]
            return init, {**facts, "init_cached": True}
        spec = loram_ref.get_initializer(task.initializer)
        path = cache_path(task, loram_ref_fingerprint())
        needs_weight = (spec.reads_weight and task.init_method == "computed"
                        and not (path is not None and path.is_file()))
        weight = self.weight(task, problem) if needs_weight else None
        init, facts = cached_init(task, problem, target, weight)
        self.inits[task.group_key] = (init, {k: v for k, v in facts.items() if k != "init_cached"})
        return init, facts


def run_layer_task(task: LayerTask, context: BatchContext | None = None) -> dict[str, Any]:
    """One run in this process: the measured fields of its row. ``context``: what the runs
    of this process's batch share (none: a run of its own, set up here)."""
    started = time.perf_counter()
    if context is None:
        device = begin_setup(task.threads, task.device)
        context = BatchContext()
    else:
        device = torch.device(task.device)
        torch.set_num_threads(task.threads)
    PHASE["now"] = "setup"
    spec = loram_ref.get_initializer(task.initializer)
    problem = context.problem(task, device)
    target = problem.target(task.alignment)
    PHASE["now"] = "initializer"
    init, facts = context.init(task, problem, target)
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
                         middle=init.R.to(device) if init.R is not None else None, train_b="B" in spec.trains)
    floor = capacity_floor(state.a0, state.p0, state.scaling, target, problem.input_var.to(device), task.rank,
                           preserves_function=state.preserves_function, only_middle=state.middle is not None,
                           only_a=state.only_a, b=state.b if state.middle is not None or state.only_a else None)
    with reusable_heap(), cpu_peak() as cpu, gpu_peak(device) as gpu:
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
        "loss_floor": rank_floor(target, problem.input_var.to(device), task.rank),
        "capacity_floor": floor,
        "progress_fraction": (progress_fraction(curve.loss[-1], floor, curve.loss[0]) if ok else None),
        "first_step_update_norm": curve.update_norm[1] if len(curve.update_norm) > 1 else None,
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


@dataclass(frozen=True)
class LayerBatch:
    """Runs of one layer shape and seed for one worker process; each finished run's result
    is appended to ``spool`` (JSON lines: ``task_key`` and the run's fields, or its failure)."""

    tasks: tuple[LayerTask, ...]
    spool: str
    run_limit_s: float = 600.0

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [t.to_dict() for t in self.tasks], "spool": self.spool, "run_limit_s": self.run_limit_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerBatch":
        return cls(tuple(LayerTask.from_dict(t) for t in data["tasks"]), data["spool"], float(data["run_limit_s"]))


class RunTimeout(Exception):
    """A run of a batch went past its own limit (raised by the alarm between Python steps)."""


def _alarm(signum, frame) -> None:
    raise RunTimeout("the run exceeded its time limit in its worker and was stopped")


def run_layer_batch(batch: LayerBatch, run_one: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run every task of ``batch`` in this process, spooling each result as it finishes.

    A run that raises is recorded as failed (or out of memory), with its phase; a run whose
    initializer call failed fails the rest of its group without calling it again. Each run
    has ``run_limit_s`` of its own (SIGALRM: it stops a run between Python steps; the
    launcher's limit for the whole batch stays the backstop). Returns counts."""
    import signal

    first = batch.tasks[0]
    begin_setup(first.threads, first.device)
    context = BatchContext()
    failed_groups: dict[str, str] = {}
    counts = {"ok": 0, "failed": 0}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        with open(batch.spool, "a") as spool:
            for task in batch.tasks:
                if task.group_key in failed_groups:
                    result = {"status": "failed", "phase": "initializer",
                              "reason": f"not run: this run's initializer call failed in an earlier run of the group: "
                                        f"{failed_groups[task.group_key]}"}
                else:
                    signal.setitimer(signal.ITIMER_REAL, batch.run_limit_s)
                    try:
                        measured = (run_one(task) if run_one is not None else run_layer_task(task, context))
                        result = {"status": "ok", **measured}
                    except RunTimeout as exc:
                        result = {"status": "timeout", "phase": PHASE["now"], "reason": str(exc)}
                    except Exception as exc:  # this run's failure; the batch goes on
                        result = failure_message(exc, [])
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                    if result["status"] != "ok" and result.get("phase") in ("setup", "initializer"):
                        failed_groups[task.group_key] = f"{result['status']}: {result['reason'][:300]}"
                counts["ok" if result["status"] == "ok" else "failed"] += 1
                spool.write(json.dumps({"task_key": task.key, **result}, default=_plain) + "\n")
                spool.flush()
    finally:
        signal.signal(signal.SIGALRM, previous)
    return counts


def _plain(value: Any) -> Any:
    """JSON for what a result may hold beyond plain types (numpy and torch scalars)."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def main() -> int:
    return serve(LayerBatch.from_dict, run_layer_batch)


if __name__ == "__main__":
    raise SystemExit(main())
