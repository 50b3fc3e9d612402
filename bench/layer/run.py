"""The layer-loss driver: (shapes x initializers x alignments x lrs x seeds) → worker runs → rows.

Each run is one worker process (``bench.layer.worker``) under a time limit, like an init
cell: a crash, an OOM kill or a hang costs that run's row, recorded with its reason and
phase. Rows go to ``layer_loss.jsonl`` as each run finishes; a rerun skips the runs already
done. Runs that share an initializer call (a *group*: ``LayerTask.group_key``) run one
after another and share its factors through a cache file, deleted when the group is done.

Before a group's first run, the init time is predicted from this folder's measured runs of
the same initializer at smaller shapes (the cost law of its registry cost class,
``bench.costlaw``). Past ``init_limit_s`` a method with a known-SVD shortcut
(``InitializerSpec.from_svd``: full-SVD PiSSA) takes its factors from W's known triplets;
any other is recorded as skipped with the prediction.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

import loram_ref

from .. import costlaw
from ..checks import check_fits, check_memory_limit, check_threads
from ..environment import environment
from ..launchers import ForkServerLauncher, Launcher, SpawnLauncher, fork_available
from ..results import OK, SKIPPED, append_row, check_writable, new_run_id, read_rows, repair
from ..schema import FAILED, SCHEMA_VERSION
from ..shapes import model_shapes, unique_shapes
from ..suites import DEFAULT_LOSS_INITIALIZERS, check_seeds_and_lrs
from .problem import ALIGNMENTS, ProblemSpec
from .task import GRADIENTS, LayerTask
from .worker import run_layer_task

RESULTS_FILE = "layer_loss.jsonl"
CACHE_DIR = "layer_cache"
#: ``--scaling``: every initializer at the shared alpha, or each at its published one.
SCALINGS = ("shared", "published")


@dataclass
class LayerConfig:
    """A layer-loss grid. Every run of one (shape, seed) trains on the same problem and,
    in sampled mode, the same batches (a paired design across initializers)."""

    presets: list[str] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    initializers: list[str] = field(default_factory=lambda: list(DEFAULT_LOSS_INITIALIZERS))
    alignments: list[str] = field(default_factory=lambda: ["random"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    steps: int = 50
    rank: int = 8
    alpha: float | None = None  # lora_alpha; None: α = r (s = 1)
    scaling: str = "shared"
    gradients: str = "exact"
    batch_size: int = 64
    sb_samples: int = 8
    da_tokens: int = 0
    spec: ProblemSpec = field(default_factory=ProblemSpec)
    device: str = "cpu"
    threads: int = 0
    init_limit_s: float = 60.0
    limit_s: float = 600.0
    memory_limit_bytes: int | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.presets and not self.shapes:
            raise ValueError("layer-loss needs --preset or --shapes (e.g. --preset llama-2-7b, --shapes 28672x8192)")
        if not self.initializers:
            raise ValueError("--initializers is empty: name at least one (see `loram-bench list`)")
        for name in self.initializers:
            spec = loram_ref.get_initializer(name)
            if spec.needs_statistics and spec.statistics.from_oracle is None:
                raise ValueError(f"{name}'s statistics cannot come from the layer task; leave it out of --initializers")
        for key in ("steps", "rank", "batch_size", "sb_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if isinstance(self.da_tokens, bool) or not isinstance(self.da_tokens, int) or self.da_tokens < 0:
            raise ValueError(f"--da-tokens must be an integer >= 0 (0: 2·d_in), got {self.da_tokens!r}")
        check_seeds_and_lrs(self.seeds, self.lrs)
        if not self.alignments:
            raise ValueError("--alignment needs at least one value")
        for alignment in self.alignments:
            if alignment not in ALIGNMENTS:
                raise ValueError(f"--alignment must be among {', '.join(ALIGNMENTS)}, got {alignment!r}")
        for flag, values in (("--initializers", self.initializers), ("--alignment", self.alignments)):
            if len(set(values)) != len(values):
                raise ValueError(f"{flag} lists a value twice: {values}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--alpha must be finite and > 0, got {self.alpha}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"--scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if self.gradients not in GRADIENTS:
            raise ValueError(f"--gradients must be one of {', '.join(GRADIENTS)}, got {self.gradients!r}")
        for flag, value in (("--init-limit", self.init_limit_s), ("--limit", self.limit_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{flag} must be > 0 and finite (seconds), got {value}")
        check_threads(self.threads, device="cpu" if self.device == "cpu" else "cuda")
        check_memory_limit(self.memory_limit_bytes)
        self.spec.validate(rank=self.rank)

    def lora_setup(self, name: str) -> tuple[float, bool, float]:
        """``(lora_alpha, use_rslora, s)`` of ``name``'s runs."""
        if self.scaling == "published":
            published = loram_ref.get_initializer(name).published
            return published.lora_alpha(self.rank), published.rslora, published.scaling(self.rank)
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return alpha, False, alpha / self.rank

    def layer_shapes(self) -> list[tuple[int, int, str, str]]:
        """``(d_out, d_in, role, source)`` of every unique shape, smallest first."""
        found: dict[tuple[int, int], tuple[str, str]] = {}
        for preset in self.presets:
            for s in unique_shapes(model_shapes(preset)):
                found.setdefault((s.d_out, s.d_in), (s.role, preset))
        for d_out, d_in in self.shapes:
            found.setdefault((d_out, d_in), ("shape", ""))
        return sorted(((m, n, role, src) for (m, n), (role, src) in found.items()), key=lambda s: (s[0] * s[1], s[0]))

    def tasks(self) -> list[LayerTask]:
        """Every run, in execution order: shapes smallest first (so cost laws exist before the
        large ones), then seed, initializer, alignment, lr (a group's runs are consecutive)."""
        self.validate()
        shapes = self.layer_shapes()
        for m, n, _, source in shapes:
            try:
                self.spec.validate(m, n, self.rank)
            except ValueError as exc:
                raise ValueError(f"{source or 'shape'} {m}x{n}: {exc}") from None
        # an initializer call sees the dense fp32 W (and an in-place one its pristine copy)
        check_fits({f"{m}x{n}": 2 * m * n * 4 for m, n, _, _ in shapes}, "cpu" if self.device == "cpu" else "cuda:0",
                   "the dense fp32 W an initializer call sees, and its copy")
        out = []
        for m, n, role, source in shapes:
            for seed in self.seeds:
                for name in self.initializers:
                    alpha, rslora, s = self.lora_setup(name)
                    for alignment in self.alignments:
                        for lr in self.lrs:
                            out.append(LayerTask(
                                initializer=name, d_out=m, d_in=n, seed=seed, lr=float(lr), alignment=alignment,
                                rank=self.rank, scaling=s, alpha=alpha, use_rslora=rslora, steps=self.steps,
                                gradients=self.gradients, batch_size=self.batch_size, sb_samples=self.sb_samples,
                                da_tokens=self.da_tokens, sb_warmup_ratio=0.02, spec=asdict(self.spec),
                                options=dict(self.options.get(name, {})), device=self.device, threads=self.threads,
                                role=role, preset=source, stats_lr=float(self.lrs[0])))
        return out


def _launcher(device: str, worker_fn: Callable[[LayerTask], dict[str, Any]]) -> Launcher:
    if device == "cpu" and fork_available():
        return ForkServerLauncher(worker_fn, decode=dict)
    return SpawnLauncher([sys.executable, "-m", "bench.layer.worker"], decode=dict)


def predict_init_seconds(task: LayerTask, rows: list[dict[str, Any]]) -> float | None:
    """The init time of ``task`` from the computed inits of the same initializer, rank and
    device in ``rows`` (the linear cost law at the largest measured size); None without any."""
    points = [(costlaw.size_variable(r["initializer"], r["d_out"], r["d_in"]), r["init_seconds"])
              for r in rows
              if r.get("kind") == "layer_loss" and r.get("status") == OK and r.get("initializer") == task.initializer
              and r.get("rank") == task.rank and r.get("device") == task.device
              and r.get("init_method") == "computed" and (r.get("init_seconds") or 0) > 0]
    if not points:
        return None
    largest = max(x for x, _ in points)
    law = costlaw.fit([p for p in points if p[0] == largest], costlaw.size_variable_name(task.initializer))
    return None if law is None else law.predict(costlaw.size_variable(task.initializer, task.d_out, task.d_in))


def done_keys(rows: list[dict[str, Any]], init_limit_s: float) -> set[str]:
    """Runs that need nothing more: finished, or skipped by a prediction under an init limit
    at least as large (a larger limit retries them). Failures are always retried."""
    done = set()
    for r in rows:
        if r.get("kind") != "layer_loss":
            continue
        if r.get("status") == OK or (r.get("status") == SKIPPED and (r.get("init_limit_s") or 0) >= init_limit_s):
            done.add(r["task_key"])
    return done


def _row(task: LayerTask, run_id: str, status: str, config: LayerConfig, **fields: Any) -> dict[str, Any]:
    data = task.to_dict()
    data.pop("cache_dir")
    data["options"] = json.dumps(data["options"], sort_keys=True)
    return {
        "kind": "layer_loss", "schema_version": SCHEMA_VERSION, "run_id": run_id,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "task_key": task.key, "config_key": task.config_key,
        "suite_key": task.suite_key, **data, **ProblemSpec(**task.spec).fields(), "status": status,
        "reason": "", "phase": "", "limit_s": config.limit_s, "init_limit_s": config.init_limit_s, **fields,
        **environment(),
    }


def run_layer_loss(config: LayerConfig, out: Path, *, progress: bool = True,
                   worker_fn: Callable[[LayerTask], dict[str, Any]] = run_layer_task,
                   run_id: str | None = None) -> list[dict[str, Any]]:
    """Run every task of ``config`` not yet in ``out/layer_loss.jsonl``; write the verdict
    tables; return every row of the file (this run's rows carry ``run_id``)."""
    import torch

    from .verdict import write_layer_verdict

    tasks = config.tasks()
    path = Path(out) / RESULTS_FILE
    check_writable(path)
    repair(path)
    rows = read_rows(path)
    done = done_keys(rows, config.init_limit_s)
    pending = [t for t in tasks if t.key not in done]
    if len(pending) < len(tasks):
        print(f"layer-loss: {len(tasks) - len(pending)} of {len(tasks)} runs already in {path}, skipped", file=sys.stderr)
    threads = config.threads or min(2, torch.get_num_threads())
    cache = Path(out).resolve() / CACHE_DIR
    launcher = _launcher(config.device, worker_fn)
    run_id = run_id or new_run_id()
    decisions: dict[str, tuple[str, float | None]] = {}  # group → (init method or "skip", predicted s)
    failed_groups: dict[str, str] = {}
    previous_group = None
    bar = tqdm(pending, desc="layer loss", unit="run", disable=not progress, dynamic_ncols=True)
    for task in bar:
        task = replace(task, threads=threads, cache_dir=str(cache))
        bar.set_postfix_str(f"{task.initializer} {task.d_out}x{task.d_in} {task.alignment} lr={task.lr:g} seed={task.seed}")
        group = task.group_key
        if previous_group is not None and group != previous_group:
            _drop_cache(cache, previous_group)
        previous_group = group
        if group not in decisions:
            decisions[group] = _decide(task, rows, config.init_limit_s)
        method, predicted = decisions[group]
        if method == SKIPPED:
            row = _row(task, run_id, SKIPPED, config, predicted_init_s=predicted,
                       reason=f"init predicted {predicted:.0f} s > init limit {config.init_limit_s:.0f} s")
        elif group in failed_groups:
            row = _row(task, run_id, FAILED, config, phase="initializer",
                       reason=f"not run: this run's initializer call failed in an earlier run of the group: {failed_groups[group]}")
        else:
            task = replace(task, init_method=method)
            outcome = launcher.launch(task, config.limit_s, config.memory_limit_bytes)
            if outcome.status == OK:
                measured = dict(outcome.run)
                measured["worker_environment"] = json.dumps(measured.get("worker_environment", {}), sort_keys=True)
                row = _row(task, run_id, OK, config, predicted_init_s=predicted, **measured)
            else:
                row = _row(task, run_id, outcome.status, config, predicted_init_s=predicted,
                           reason=outcome.reason[:1000], phase=outcome.phase)
                if outcome.phase in ("setup", "initializer"):
                    failed_groups[group] = f"{outcome.status}: {outcome.reason[:300]}"
        append_row(path, row)
        rows.append(row)
        if row["status"] != OK:
            bar.write(f"  {task.initializer} {task.d_out}x{task.d_in} {task.alignment} lr={task.lr:g} seed={task.seed}: "
                      f"{row['status']}: {row['reason']}")
    bar.close()
    if previous_group is not None:
        _drop_cache(cache, previous_group)
    if cache.is_dir() and not any(cache.iterdir()):
        cache.rmdir()
    write_layer_verdict(rows, Path(out))
    return rows


def _drop_cache(cache: Path, group: str) -> None:
    """Delete a finished group's cache files (one per ``loram_ref`` fingerprint, ``bench.layer.worker.cache_path``)."""
    for path in cache.glob(f"{group}-*.pt"):
        path.unlink(missing_ok=True)


def _decide(task: LayerTask, rows: list[dict[str, Any]], init_limit_s: float) -> tuple[str, float | None]:
    """How a group gets its init: computed, from the known SVD, or skipped (with the prediction)."""
    predicted = predict_init_seconds(task, rows)
    if predicted is None or predicted <= init_limit_s:
        return "computed", predicted
    if loram_ref.get_initializer(task.initializer).from_svd is not None:
        return "known-svd", predicted
    return SKIPPED, predicted
