"""The layer-loss driver: (shapes x cells x alignments x initializers x lrs x seeds) → worker batches → rows.

Stages, each resumable (a rerun skips the runs already in ``layer_loss.jsonl`` and recomputes
every decision from the rows):

1. **selection**: the starting lr grid on the selection seeds (or, without any, on the
   evaluation seeds: the quick design);
2. **brackets**: per (configuration, initializer), while the best lr sits at an edge of
   the lrs run, one more lr beyond it (``bench.core.brackets``), until it is bracketed or
   the extensions per side are spent;
3. **evaluation**: every initializer at its chosen lr on the evaluation seeds;
4. **magnitude** (``--loram-gains``): LoRAM at gain c·β for each c at its chosen lr, and
   noise-zeros at the lr that matches each LoRAM arm's first-step ‖ΔW_eff‖
   (:func:`matched_noise_lr`), on the evaluation seeds.

A worker process runs a *batch*: the pending runs of one layer shape and seed, which share
W and the problem. Each finished run is spooled at once, so a crash, an OOM kill or a hang
costs the run in progress (recorded with its reason and phase) and the rest of the batch is
run again in a new worker. Runs that share an initializer call (a *group*:
``LayerTask.group_key``) share its factors in the worker's memory and, across batches and
stages, through a cache file (O((m+n)·r) bytes each), deleted when the call returns.

Before a group's first run, the init time is predicted from this folder's measured runs of
the same initializer at smaller shapes (the cost law of its registry cost class,
``bench.core.costlaw``). Past ``init_limit_s`` a method with a known-SVD shortcut
(``InitializerSpec.from_svd``: full-SVD PiSSA) takes its factors from W's known triplets;
any other is recorded as skipped with the prediction.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

import loram_ref
from bench.core import costlaw
from bench.core.brackets import MAX_EXTENSIONS, LrChoice, choose_lr
from bench.core.defaults import LOSS_REFERENCE
from bench.core.environment import environment
from bench.core.launchers import launcher_for, preload, worker_command
from bench.core.results import append_row, done_keys, new_run_id, resume, timestamp
from bench.core.rows import FAILED, LAYER_LOSS, OK, SKIPPED
from bench.layer.config import LayerConfig, keywords_of
from bench.layer.problem import ProblemSpec
from bench.layer.task import LayerTask

#: the fork server imports this benchmark's worker module before it forks
preload("bench.layer.worker")

RESULTS_FILE = "layer_loss.jsonl"
CACHE_DIR = "layer_cache"
#: seconds per run a batch's backstop limit allows beyond one run's ``--limit``
BATCH_SLACK_S = 30.0


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


def _row(task: LayerTask, run_id: str, status: str, config: LayerConfig, **fields: Any) -> dict[str, Any]:
    data = task.to_dict()
    data.pop("cache_dir")
    data["options"] = json.dumps(data["options"], sort_keys=True)
    return {
        "kind": "layer_loss", "schema_version": LAYER_LOSS.version, "run_id": run_id,
        "timestamp": timestamp(), "task_key": task.key, "config_key": task.config_key,
        "suite_key": task.suite_key, "plane_key": task.plane_key, "lr_grid": json.dumps([float(v) for v in config.lrs]),
        "equivalence_margin": config.equivalence_margin,
        **data, **ProblemSpec(**task.spec).fields(), "status": status,
        "reason": "", "phase": "", "limit_s": config.limit_s, "init_limit_s": config.init_limit_s, **fields,
        **environment(),
    }


def matched_noise_lr(lr: float, beta: float, m: int, n: int, loram_scaling: float = 1.0,
                     noise_scaling: float = 1.0) -> float:
    """The noise-zeros lr whose first AdamW step moves ``W_eff`` as far as LoRAM's at ``lr``.

    Adam's first step is ``lr·sign(g)`` per entry (bias-corrected moments: ``m̂/√v̂ = g/|g|``).
    LoRAM (``A = β·Φ_inᵀ``, ``B = β·Φ_out``, orthonormal Φ) moves both factors:
    ``ΔW_eff ≈ −s·lr·(S_B·A + B·S_A)`` with ±1 matrices ``S_B`` (m x r) and ``S_A`` (r x n), so
    ``‖ΔW_eff‖_F ≈ s·lr·β·√r·√(m + n)`` (the two terms' cross term and the ``lr²`` term are
    small). Noise-zeros (``B = 0``, ``A`` Kaiming-uniform with variance ``1/(3n)``) moves
    only B: ``‖ΔW_eff‖_F = s·lr·‖S_B·A‖_F ≈ s·lr·√(m·r/3)``. Equal norms give

        lr_nz = lr · (s_L/s_nz) · β·√3·√(1 + n/m).

    ``beta`` is the arm's amplitude (``c·β`` for gain c, as its init info records).
    """
    return float(lr) * (loram_scaling / noise_scaling) * float(beta) * math.sqrt(3.0) * math.sqrt(1.0 + n / m)


def run_layer_loss(config: LayerConfig, out: Path, *, progress: bool = True,
                   worker_fn: Callable[[LayerTask], dict[str, Any]] | None = None,
                   run_id: str | None = None) -> list[dict[str, Any]]:
    """Run every stage of ``config`` (module docstring) not yet in ``out/layer_loss.jsonl``;
    write the verdict tables; return every row of the file (this run's rows carry ``run_id``).
    ``worker_fn``: a function a batch's worker runs per task instead of the benchmark's (tests)."""
    from bench.layer.verdict import write_layer_verdict

    starting = config.tasks()  # validates the whole grid before anything is written
    driver = _Driver(config, Path(out), progress, worker_fn, run_id or new_run_id())
    driver.execute(starting, "selection")
    driver.bracket(starting)
    if config.selection_seeds:
        driver.execute(driver.evaluation_tasks(starting), "evaluation")
    if config.loram_gains:
        arms = driver.gain_tasks(starting)
        driver.execute(arms, "magnitude (LoRAM gains)")
        driver.execute(driver.matched_tasks(arms), "magnitude (matched noise-zeros)")
    driver.finish()
    write_layer_verdict(driver.rows, Path(out), margin=config.equivalence_margin)
    return driver.rows


class _Driver:
    """The state of one ``run_layer_loss`` call: the rows, the decisions, the launcher."""

    def __init__(self, config: LayerConfig, out: Path, progress: bool, worker_fn, run_id: str) -> None:
        import functools

        import torch

        from bench.layer.worker import run_layer_batch

        self.config, self.out, self.progress, self.run_id = config, out, progress, run_id
        self.path = out / RESULTS_FILE
        self.rows = resume(self.path)
        self.threads = config.threads or min(2, torch.get_num_threads())
        self.cache = out.resolve() / CACHE_DIR
        body = run_layer_batch if worker_fn is None else functools.partial(run_layer_batch, run_one=worker_fn)
        self.launcher = launcher_for(config.device, body, worker_command("bench.layer.worker"))
        self.decisions: dict[str, tuple[str, float | None]] = {}  # group → (init method or "skip", predicted s)
        self.failed_groups: dict[str, str] = {}

    # -- the stages' tasks ------------------------------------------------------------------
    def _ok(self) -> dict[str, dict[str, Any]]:
        return {r["task_key"]: r for r in self.rows if r.get("kind") == "layer_loss" and r.get("status") == OK}

    def _choices(self, starting: list[LayerTask]) -> tuple[dict[tuple[str, str], LrChoice], dict[tuple[str, str], LayerTask]]:
        """Per (configuration, initializer): the lr choice from the selection rows, and a
        selection task to derive new runs from."""
        ok = self._ok()
        selection_seeds = set(self.config.selection_seeds or self.config.seeds)
        templates: dict[tuple[str, str], LayerTask] = {}
        for task in starting:
            templates.setdefault((task.config_key, task.initializer), task)
        choices = {}
        for key, template in templates.items():
            means: dict[float, float] = {}
            for lr in self._lrs_run(template, ok):
                found = [ok.get(replace(template, lr=lr, seed=seed).key) for seed in selection_seeds]
                if any(row is None for row in found):
                    continue  # an lr without a finished run on every selection seed (failed, skipped) is not judged
                values = [math.nan if row.get("diverged_step") else float(row["final_loss"]) for row in found]
                means[lr] = float(sum(values) / len(values)) if all(math.isfinite(v) for v in values) else math.nan
            limit = MAX_EXTENSIONS if self.config.bracket else 0
            choices[key] = choose_lr(means, list(self.config.lrs), max_extensions=limit)
        return choices, templates

    def _lrs_run(self, template: LayerTask, ok: dict[str, dict[str, Any]]) -> list[float]:
        """The lrs with rows for the template's configuration and initializer on a selection
        seed, the starting grid included."""
        seeds = set(self.config.selection_seeds or self.config.seeds)
        lrs = {float(lr) for lr in self.config.lrs}
        for row in ok.values():
            if (row.get("config_key") == template.config_key and row.get("initializer") == template.initializer
                    and not row.get("arm") and row.get("seed") in seeds):
                lrs.add(float(row["lr"]))
        return sorted(lrs)

    def bracket(self, starting: list[LayerTask]) -> None:
        """Extend each unbracketed grid, one lr per side and round, until every choice is final."""
        seeds = self.config.selection_seeds or self.config.seeds
        for round_ in range(1, 2 * MAX_EXTENSIONS + 1):
            choices, templates = self._choices(starting)
            extra = [replace(templates[key], lr=choice.next_lr, seed=seed)
                     for key, choice in choices.items() if choice.next_lr is not None for seed in seeds]
            if not extra:
                return
            extra.sort(key=lambda t: (t.d_out * t.d_in, t.d_out, t.seed))
            self.execute(extra, f"brackets, round {round_}")

    def chosen(self, starting: list[LayerTask]) -> dict[tuple[str, str], tuple[LayerTask, LrChoice]]:
        choices, templates = self._choices(starting)
        return {key: (templates[key], choice) for key, choice in choices.items() if choice.lr is not None}

    def evaluation_tasks(self, starting: list[LayerTask]) -> list[LayerTask]:
        out = [replace(template, lr=choice.lr, seed=seed, stage="evaluation")
               for (template, choice) in self.chosen(starting).values() for seed in self.config.seeds]
        return sorted(out, key=lambda t: (t.d_out * t.d_in, t.d_out, t.seed))

    def gain_tasks(self, starting: list[LayerTask]) -> list[LayerTask]:
        """LoRAM at c·β for each gain c ≠ 1 (c = 1 is its evaluation run), at its chosen lr."""
        out = []
        for (template, choice) in self.chosen(starting).values():
            if "gain_multiplier" not in keywords_of(template.initializer):
                continue
            for gain in self.config.loram_gains:
                if float(gain) == 1.0:
                    continue
                for seed in self.config.seeds:
                    out.append(replace(template, lr=choice.lr, seed=seed, stage="magnitude", arm=f"gain {gain:g}",
                                       options={**template.options, "gain_multiplier": float(gain)}))
        return sorted(out, key=lambda t: (t.d_out * t.d_in, t.d_out, t.seed))

    def matched_tasks(self, arms: list[LayerTask]) -> list[LayerTask]:
        """Noise-zeros at the lr matching each LoRAM arm's first-step ‖ΔW_eff‖ (c = 1, the
        evaluation run, included), from the arm's recorded amplitude ``c·β``."""
        ok = self._ok()
        chosen = self.chosen(self.config.tasks())
        out = []
        for (config_key, name), (template, choice) in chosen.items():
            noise = chosen.get((config_key, LOSS_REFERENCE))
            if "gain_multiplier" not in keywords_of(name) or noise is None:
                continue
            for gain in self.config.loram_gains:
                arm = replace(template, lr=choice.lr, seed=self.config.seeds[0])
                if float(gain) != 1.0:
                    arm = replace(arm, arm=f"gain {gain:g}", options={**template.options, "gain_multiplier": float(gain)})
                row = ok.get(arm.key)
                beta = float(json.loads(row.get("init_info") or "{}").get("beta", math.nan)) if row else math.nan
                if not math.isfinite(beta):
                    continue  # the arm's run failed: no amplitude to match
                lr = matched_noise_lr(choice.lr, beta, template.d_out, template.d_in, template.scaling,
                                      noise[0].scaling)
                out.extend(replace(noise[0], lr=lr, seed=seed, stage="magnitude", arm=f"matched to {name} gain {gain:g}")
                           for seed in self.config.seeds)
        return sorted(out, key=lambda t: (t.d_out * t.d_in, t.d_out, t.seed))

    # -- execution -----------------------------------------------------------------------------
    def execute(self, tasks: list[LayerTask], stage: str) -> None:
        """Run the tasks not yet done, in batches of one shape and seed."""
        done = done_keys(self.rows, LAYER_LOSS, self.config.init_limit_s)
        seen: set[str] = set()
        pending = []
        for task in tasks:
            if task.key not in done and task.key not in seen:
                seen.add(task.key)
                pending.append(replace(task, threads=self.threads, cache_dir=str(self.cache)))
        if len(pending) < len(tasks):
            print(f"layer-loss {stage}: {len(tasks) - len(pending)} of {len(tasks)} runs already in {self.path}, "
                  "skipped", file=sys.stderr)
        if not pending:
            return
        bar = tqdm(total=len(pending), desc=f"layer loss: {stage}", unit="run", disable=not self.progress,
                   dynamic_ncols=True)
        batches: dict[tuple[int, int, int], list[LayerTask]] = {}
        for task in pending:
            batches.setdefault((task.d_out, task.d_in, task.seed), []).append(task)
        for (m, n, seed), batch in batches.items():
            bar.set_postfix_str(f"{m}x{n} seed={seed}")
            self._run_batch(batch, bar)
        bar.close()

    def _run_batch(self, batch: list[LayerTask], bar) -> None:
        from bench.layer.worker import LayerBatch

        runnable = []
        for task in batch:
            group = task.group_key
            if group not in self.decisions:
                self.decisions[group] = _decide(task, self.rows, self.config.init_limit_s)
            method, predicted = self.decisions[group]
            if method == SKIPPED:
                self._record(task, SKIPPED, predicted_init_s=predicted,
                             reason=f"init predicted {predicted:.0f} s > init limit {self.config.init_limit_s:.0f} s")
                bar.update(1)
            elif group in self.failed_groups:
                self._record(task, FAILED, phase="initializer",
                             reason=f"not run: this run's initializer call failed in an earlier run of the group: "
                                    f"{self.failed_groups[group]}")
                bar.update(1)
            else:
                runnable.append(replace(task, init_method=method))
        while runnable:
            self.cache.mkdir(parents=True, exist_ok=True)
            fd, spool = tempfile.mkstemp(prefix="spool-", suffix=".jsonl", dir=self.cache)
            os.close(fd)
            # each run has --limit of its own inside the worker; the batch's backstop allows one run
            # at its limit plus a generous 30 s for every other (a run takes 0.02-10 s)
            limit = self.config.limit_s + BATCH_SLACK_S * len(runnable)
            outcome = self.launcher.launch(LayerBatch(tuple(runnable), spool, self.config.limit_s), limit,
                                           self.config.memory_limit_bytes)
            results = _read_spool(Path(spool))
            Path(spool).unlink(missing_ok=True)
            finished = 0
            for task in runnable:
                result = results.get(task.key)
                if result is None:
                    break
                finished += 1
                self._record_result(task, result)
                bar.update(1)
            rest = runnable[finished:]
            if not rest:
                return
            # the worker died in the first run without a result: that run gets the outcome, the rest run again
            culprit, runnable = rest[0], rest[1:]
            status = outcome.status if outcome.status != OK else FAILED
            reason = outcome.reason or "the worker ended without this run's result"
            self._record(culprit, status, predicted_init_s=self.decisions[culprit.group_key][1],
                         reason=reason[:1000], phase=outcome.phase or "")
            if outcome.phase in ("setup", "initializer"):
                self.failed_groups[culprit.group_key] = f"{status}: {reason[:300]}"
            bar.update(1)
            for task in [t for t in runnable if t.group_key in self.failed_groups]:
                self._record(task, FAILED, phase="initializer",
                             reason=f"not run: this run's initializer call failed in an earlier run of the group: "
                                    f"{self.failed_groups[task.group_key]}")
                bar.update(1)
            runnable = [t for t in runnable if t.group_key not in self.failed_groups]

    def _record_result(self, task: LayerTask, result: dict[str, Any]) -> None:
        status = result.pop("status")
        result.pop("task_key", None)
        predicted = self.decisions[task.group_key][1]
        if status == OK:
            result["worker_environment"] = json.dumps(result.get("worker_environment", {}), sort_keys=True)
            self._record(task, OK, predicted_init_s=predicted, **result)
        else:
            self._record(task, status, predicted_init_s=predicted, reason=str(result.get("reason", ""))[:1000],
                         phase=str(result.get("phase", "")))
            if result.get("phase") in ("setup", "initializer"):
                self.failed_groups.setdefault(task.group_key, f"{status}: {str(result.get('reason', ''))[:300]}")

    def _record(self, task: LayerTask, status: str, **fields: Any) -> None:
        row = _row(task, self.run_id, status, self.config, **fields)
        append_row(self.path, row)
        self.rows.append(row)
        if status != OK and self.progress:
            tqdm.write(f"  {task.initializer} {task.d_out}x{task.d_in} {task.alignment} lr={task.lr:g} "
                       f"seed={task.seed}: {status}: {row['reason']}")

    def _drop_cache(self) -> None:
        """Delete the cache files (one per group and ``loram_ref`` fingerprint)."""
        for path in self.cache.glob("*.pt"):
            path.unlink(missing_ok=True)

    def finish(self) -> None:
        self._drop_cache()
        if self.cache.is_dir() and not any(self.cache.iterdir()):
            self.cache.rmdir()


def _read_spool(path: Path) -> dict[str, dict[str, Any]]:
    """The results a batch's worker spooled, by task key (a torn last line is ignored)."""
    out = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and isinstance(item.get("task_key"), str) and "status" in item:
            out[item["task_key"]] = item
    return out


def _decide(task: LayerTask, rows: list[dict[str, Any]], init_limit_s: float) -> tuple[str, float | None]:
    """How a group gets its init: computed, from the known SVD, or skipped (with the prediction)."""
    predicted = predict_init_seconds(task, rows)
    if predicted is None or predicted <= init_limit_s:
        return "computed", predicted
    if loram_ref.get_initializer(task.initializer).from_svd is not None:
        return "known-svd", predicted
    return SKIPPED, predicted
