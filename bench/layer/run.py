"""The layer-loss driver: (shapes x initializers x alignments x lrs x seeds) → worker runs → rows.

Each run is one worker process (``bench.layer.worker``) under a time limit, like an init
cell: a crash, an OOM kill or a hang costs that run's row, recorded with its reason and
phase. Rows go to ``layer_loss.jsonl`` as each run finishes; a rerun skips the runs already
done. Runs that share an initializer call (a *group*: ``LayerTask.group_key``) run one
after another and share its factors through a cache file, deleted when the group is done.

Before a group's first run, the init time is predicted from this folder's measured runs of
the same initializer at smaller shapes (the cost law of its registry cost class,
``bench.core.costlaw``). Past ``init_limit_s`` a method with a known-SVD shortcut
(``InitializerSpec.from_svd``: full-SVD PiSSA) takes its factors from W's known triplets;
any other is recorded as skipped with the prediction.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

import loram_ref
from bench.core import costlaw
from bench.core.environment import environment
from bench.core.launchers import launcher_for, preload, worker_command
from bench.core.results import append_row, done_keys, new_run_id, resume, timestamp
from bench.core.rows import FAILED, LAYER_LOSS, OK, SKIPPED
from bench.layer.config import LayerConfig
from bench.layer.problem import ProblemSpec
from bench.layer.task import LayerTask
from bench.layer.worker import run_layer_task

#: the fork server imports this benchmark's worker module before it forks
preload("bench.layer.worker")

RESULTS_FILE = "layer_loss.jsonl"
CACHE_DIR = "layer_cache"
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

    from bench.layer.verdict import write_layer_verdict

    tasks = config.tasks()
    path = Path(out) / RESULTS_FILE
    rows = resume(path)
    done = done_keys(rows, LAYER_LOSS, config.init_limit_s)
    pending = [t for t in tasks if t.key not in done]
    if len(pending) < len(tasks):
        print(f"layer-loss: {len(tasks) - len(pending)} of {len(tasks)} runs already in {path}, skipped", file=sys.stderr)
    threads = config.threads or min(2, torch.get_num_threads())
    cache = Path(out).resolve() / CACHE_DIR
    launcher = launcher_for(config.device, worker_fn, worker_command("bench.layer.worker"))
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
