"""The loss benchmark's driver: per (seed, initializer, lr), load → init → train → rows.

Rows go to ``loss.jsonl`` as each run finishes (a crash loses only the run in progress;
a rerun skips the (initializer, lr, seed) runs already done with the same configuration):
``kind="loss"`` per step (train loss, eval loss every k steps, update magnitude) and one
``kind="loss_summary"`` per run (init time, statistics pass time and memory, step-0
diagnostics, final losses, area under the eval curve). At the end the verdict over seeds
(``bench.loss.verdict``) is written to ``loss_stats.csv``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import loram_ref
from bench.core.brackets import MAX_EXTENSIONS, LrChoice, choose_lr
from bench.core.environment import environment
from bench.core.results import append_rows, done_keys, export_kind, resume, timestamp
from bench.core.rows import LOSS_SUMMARY
from bench.loss.apply import apply_initializer, lora_layers, merge_lora_sb, snapshot_factors, update_spectra
from bench.loss.config import LossConfig
from bench.loss.data import Blocks, load_corpus, make_blocks
from bench.loss.model import TARGETS, ModelSource, local_source, quiet_transformers, smollm2_source
from bench.loss.stats_pass import Collected, collect_shared
from bench.loss.train import eval_loss, train
from bench.loss.verdict import write_verdict
from loram_ref import CollectContext, StatisticsKind


@dataclass
class _Statistics:
    """One statistics pass, shared by every learning rate of one seed."""

    collected: Collected
    lr: float  # the learning rate it was collected at (LoRA-SB's η depends on it)


def _collect(kinds: list[StatisticsKind], source: ModelSource, blocks: Blocks, config: LossConfig,
             targets: list[str]) -> dict[str, _Statistics]:
    """Every kind's statistics from one pass on a fresh base model, each over the seed's first
    ``config.stats_samples(kind)`` training blocks (``bench.loss.stats_pass.collect_shared``)."""
    dtype = getattr(torch, config.dtype)
    model, _ = source.load(dtype, config.device)
    lr = config.lrs[0]
    ctx = CollectContext(batch_size=config.batch_size, lr=lr, num_train=len(blocks.train),
                         warmup_ratio=config.sb_warmup_ratio)
    blocks_by_kind = {kind.name: (kind, blocks.train[blocks.order[: config.stats_samples(kind)]].to(config.device))
                      for kind in kinds}
    return {name: _Statistics(collected, lr)
            for name, collected in collect_shared(model, blocks_by_kind, targets, ctx).items()}


def _omp_settings() -> dict[str, str]:
    return {k.lower(): os.environ.get(k, "") for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}


def run_loss(config: LossConfig, out: Path, *, progress: bool = True, source: ModelSource | None = None) -> list[dict[str, Any]]:
    """Run every (initializer, lr, seed) of ``config`` not yet in ``out/loss.jsonl``; export
    the tables and the verdict (``loss_stats.csv``); return all rows of the file.

    Seeds are the outer loop: a seed's batch order and statistics samples are drawn once,
    each statistics pass runs once per seed and is reused (re-derived where it depends on
    the learning rate) for every lr of that seed.
    """
    config.validate()
    quiet_transformers()
    if config.threads:
        torch.set_num_threads(config.threads)
    dtype = getattr(torch, config.dtype)
    autocast = config.autocast_dtype()
    amp = None if autocast == "none" else getattr(torch, autocast)
    source = source or (local_source(config.model_path) if config.model_path else smollm2_source())
    corpus = load_corpus(config.data)
    base, tokenizer = source.load(dtype, config.device)
    smallest = min((min(m.in_features, m.out_features) for n, m in base.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS), default=0)
    if config.rank > smallest:
        raise ValueError(f"--rank {config.rank} exceeds the smallest target layer side of {source.name} ({smallest})")
    ids = tokenizer(corpus.text)["input_ids"]
    split = make_blocks(ids, config.seq_len, 0, max_eval=config.eval_blocks)
    if len(split.eval) < config.eval_blocks:
        print(f"loss: the corpus holds {len(split.eval)} held-out blocks, fewer than --eval-blocks {config.eval_blocks}",
              file=sys.stderr)
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)} & set(TARGETS))
    if not targets:
        raise ValueError(f"{source.name} has none of the target linear layers {TARGETS}")

    path = out / "loss.jsonl"
    rows = resume(path)
    key = config.key(source.name, corpus.sha256)
    meta = {
        "config_key": key, "model": source.name, **{f"model_{k}": v for k, v in source.meta.items()},
        "data": corpus.name, "data_sha256": corpus.sha256, "train_blocks": len(split.train),
        "eval_blocks": len(split.eval), "tokens": len(ids), "steps": config.steps, "batch_size": config.batch_size,
        "seq_len": config.seq_len, "rank": config.rank, "scaling_mode": config.scaling, "eval_every": config.eval_every,
        "device": config.device, "dtype": config.dtype, "autocast": autocast, "threads": torch.get_num_threads(),
        "targets": ",".join(targets), "base_eval_loss": math.nan, "warmup_steps": config.warmup_steps,
        "schedule": config.schedule, "lr_grid": json.dumps([float(v) for v in config.lrs]),
        "equivalence_margin": config.equivalence_margin, **_omp_settings(),
    }
    runner = _Runner(config, source, split, targets, amp, meta, rows, path, progress)
    runner.base = base
    selection_seeds = config.selection_seeds or config.seeds
    stage = "selection" if config.selection_seeds else "selection+evaluation"
    runner.run([(seed, name, lr) for seed in selection_seeds for name in config.initializers for lr in config.lrs],
               stage)
    for _ in range(2 * MAX_EXTENSIONS):
        extra = [(seed, name, choice.next_lr) for name, choice in _choices(runner.rows, key, config).items()
                 if choice.next_lr is not None for seed in selection_seeds]
        if not extra:
            break
        runner.run(sorted(extra), stage)
    if config.selection_seeds:
        chosen = _choices(runner.rows, key, config)
        runner.run([(seed, name, chosen[name].lr) for seed in config.seeds for name in config.initializers
                    if chosen.get(name) is not None and chosen[name].lr is not None], "evaluation")
    runner.base = None
    rows = runner.rows
    export_kind(rows, out, "loss")
    export_kind(rows, out, "loss_summary")
    write_verdict(rows, out)
    return rows


def _choices(rows: list[dict[str, Any]], key: str, config: LossConfig) -> dict[str, LrChoice]:
    """Each initializer's lr choice from this configuration's selection-stage summaries."""
    seeds = set(config.selection_seeds or config.seeds)
    finals: dict[tuple[str, float], dict[int, float]] = {}
    for row in rows:
        if row.get("kind") != "loss_summary" or row.get("config_key") != key or row.get("seed") not in seeds:
            continue
        value = float(row["final_eval_loss"]) if not row.get("diverged_step") else math.nan
        finals.setdefault((row["initializer"], float(row["lr"])), {})[int(row["seed"])] = value
    out = {}
    limit = MAX_EXTENSIONS if config.bracket else 0
    for name in config.initializers:
        means = {}
        for (initializer, lr), by_seed in finals.items():
            if initializer == name and set(by_seed) >= seeds:
                values = [by_seed[s] for s in seeds]
                means[lr] = sum(values) / len(values) if all(math.isfinite(v) for v in values) else math.nan
        out[name] = choose_lr(means, list(config.lrs), max_extensions=limit)
    return out


class _Runner:
    """Runs (seed, initializer, lr) items of one configuration, appending their rows; a
    seed's statistics, for every data-aware initializer of the configuration, come from one
    pass, kept while consecutive items share the seed."""

    def __init__(self, config, source, split, targets, amp, meta, rows, path, progress) -> None:
        self.config, self.source, self.split, self.targets, self.amp = config, source, split, targets, amp
        self.meta, self.rows, self.path, self.progress = meta, rows, path, progress
        self.base = None
        self.cached: tuple[int, dict[str, _Statistics]] | None = None

    def run(self, items: list[tuple[int, str, float]], stage: str) -> None:
        config = self.config
        done = done_keys(self.rows, LOSS_SUMMARY)
        pending = [g for g in dict.fromkeys(items) if LOSS_SUMMARY.key_of(
            {"config_key": self.meta["config_key"], "initializer": g[1], "lr": float(g[2]), "seed": int(g[0])}) not in done]
        if len(pending) < len(items):
            print(f"loss ({stage}): {len(items) - len(pending)} of {len(items)} runs already done for this "
                  "configuration, skipped", file=sys.stderr)
        if not pending:
            return
        if math.isnan(self.meta["base_eval_loss"]):
            self.meta["base_eval_loss"] = eval_loss(self.base, self.split.eval.to(config.device), config.batch_size,
                                                    self.amp)
            self.base = None  # measured once; not held during the runs
        started = time.perf_counter()
        for index, (seed, name, lr) in enumerate(pending):
            blocks = self.split.for_seed(seed)
            kind = loram_ref.get_initializer(name).statistics
            statistics = None
            if kind.needed:
                if self.cached is None or self.cached[0] != seed:
                    self.cached = None  # one seed's statistics in memory at a time (seeds are the outer loop)
                    kinds = {s.statistics.name: s.statistics for s in map(loram_ref.get_initializer, config.initializers)
                             if s.needs_statistics}
                    self.cached = (seed, _collect(list(kinds.values()), self.source, blocks, config, self.targets))
                statistics = self.cached[1][kind.name]
            alpha, rslora = config.lora_setup(name)
            run_meta = {**self.meta, "lr": float(lr), "seed": int(seed), "alpha": alpha, "use_rslora": rslora,
                        "stage": stage}
            label = f"loss {name} lr={lr:g} seed={seed} [{stage} {index + 1}/{len(pending)}]"
            run_rows = _one_run(name, lr, seed, self.source, blocks, config, statistics, self.amp, run_meta, label,
                                self.progress, self.targets)
            append_rows(self.path, run_rows)  # one write: a run's steps and summary land together
            self.rows.extend(run_rows)
            elapsed = time.perf_counter() - started
            left = elapsed / (index + 1) * (len(pending) - index - 1)
            summary = run_rows[-1]
            outcome = (f"diverged at step {summary['diverged_step']}" if summary["diverged_step"]
                       else f"final eval loss {summary['final_eval_loss']:.4f}")
            print(f"{label}: {outcome}, {summary['mean_step_s']:.2f} s/step; "
                  f"{elapsed:.0f} s so far, about {left:.0f} s left", file=sys.stderr, flush=True)


def _one_run(name: str, lr: float, seed: int, source: ModelSource, blocks: Blocks, config: LossConfig,
             statistics: _Statistics | None, amp: torch.dtype | None, run_meta: dict[str, Any], label: str,
             progress: bool, targets: list[str]) -> list[dict[str, Any]]:
    """Load → init → train one (initializer, lr, seed); return its rows."""
    from peft import LoraConfig, get_peft_model

    model, _ = source.load(getattr(torch, config.dtype), config.device)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=config.rank, lora_alpha=run_meta["alpha"], use_rslora=run_meta["use_rslora"], target_modules=targets, lora_dropout=0.0,
                      init_lora_weights=False)
    model = get_peft_model(model, lora)
    stats = stats_meta = None
    if statistics is not None:
        kind = loram_ref.get_initializer(name).statistics
        stats, stats_meta = kind.at_lr(statistics.collected.stats, statistics.collected.meta, statistics.lr, lr)
    t0 = time.perf_counter()
    layers = apply_initializer(model, name, seed=seed, stats=stats, options=config.options.get(name))
    init_seconds = time.perf_counter() - t0
    if amp is not None and config.save_adapters is None:
        _store_frozen_in(model, amp)
    torch.manual_seed(seed)
    start = snapshot_factors(model)
    bar = tqdm(total=config.steps, desc=label, unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    curve = train(model, blocks, steps=config.steps, batch_size=config.batch_size, lr=lr,
                  eval_every=config.eval_every, device=config.device, autocast=amp,
                  warmup_steps=config.warmup_steps, schedule=config.schedule,
                  on_step=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
    bar.close()
    spectra = update_spectra(model, start, [layer.w_norm for layer in layers]) if not curve.diverged_step else {}
    if config.save_adapters is not None:
        _save(model, config.save_adapters / f"{name}-lr{lr:g}-seed{seed}")
    stats_info = {}
    if statistics is not None:
        stats_info = {"stats_collected_lr": statistics.lr, "stats_derived": statistics.lr != lr,
                      **{f"stats_{k}": v for k, v in (stats_meta or {}).items() if isinstance(v, (int, float))}}
    stats_info.update({f"delta_{key}_{kind}": value for kind, found in spectra.items()
                       for key, value in found.items() if key != "layers"})
    return _rows(name, run_meta, curve, layers, init_seconds, statistics.collected if statistics else None, model,
                 stats_info)


def _store_frozen_in(model, dtype: torch.dtype) -> None:
    """Keep the frozen base weights of the adapted layers in the autocast dtype: autocast
    rounds them to it at every matmul anyway (the same numbers), and re-casting 100 M
    weights per step cost ~8 % of a CPU step. Not done when adapters are saved: the
    residual base weights are saved at full precision."""
    for _, layer in lora_layers(model):
        weight = layer.get_base_layer().weight
        weight.data = weight.data.to(dtype)


def _save(model, folder: Path) -> None:
    """The trained adapter as a plain PEFT adapter for the original base model
    (``loram_ref.peft.save_as_plain_lora``: rank 2r where the initializer rewrote W, LoRA-SB's
    R folded into A). Where no plain form exists (a quantized base), the adapter as trained
    plus the base weights it must be loaded onto (``residual_base.safetensors``)."""
    import loram_ref
    from loram_ref.peft import save_as_plain_lora

    name = next(iter(layer.loram_initial["default"].method for _, layer in lora_layers(model)))
    if loram_ref.get_initializer(name).invariant is not loram_ref.Invariant.QUANTIZED:
        save_as_plain_lora(model, folder)
        return
    from safetensors.torch import save_file

    merge_lora_sb(model)
    model.save_pretrained(folder)
    base = {k.replace(".base_layer", ""): v.detach().contiguous() for k, v in model.get_base_model().state_dict().items()
            if "lora_" not in k and k.endswith(".base_layer.weight")}
    save_file(base, folder / "residual_base.safetensors")


def _rows(name, meta, curve, layers, init_seconds, collected, model, stats_info) -> list[dict[str, Any]]:
    env = environment()
    # run_uid ties a run's step rows to its summary: readers keep steps only of runs whose
    # summary was written, so a run cut off mid-write is measured again, never doubled
    common = {"schema_version": LOSS_SUMMARY.version, "initializer": name, "run_uid": uuid.uuid4().hex[:12], **meta}
    steps = [
        {"kind": "loss", **common, "step": i + 1, "train_loss": curve.train_loss[i], "eval_loss": curve.eval_loss[i],
         "update_norm": curve.update_norm[i], "step_s": curve.step_seconds[i]}
        for i in range(len(curve.train_loss))
    ]
    w_sq = sum(l.w_norm**2 for l in layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    evals = [v for v in curve.eval_loss if not math.isnan(v)]
    summary = {
        "kind": "loss_summary", **common, **env,
        "timestamp": timestamp(),
        "init_seconds": init_seconds,
        "init_layer_seconds": sum(l.seconds for l in layers),
        "layers": len(layers),
        "trainable_params": trainable,
        "stats_seconds": collected.seconds if collected else 0.0,
        "stats_samples": collected.samples if collected else 0,
        "stats_peak_cpu_extra_bytes": collected.peak_cpu_extra_bytes if collected else 0,
        "stats_peak_gpu_allocated_bytes": collected.peak_gpu_allocated_bytes if collected else 0,
        # step-0 diagnostics (docs/initializers.md §9): ‖W_eff - W‖_F over all layers and ‖s·B·A‖_F/‖W‖_F
        "step0_shift_norm": math.sqrt(sum(l.output_shift**2 for l in layers)),
        "step0_delta_rel_norm": math.sqrt(sum(l.delta_norm**2 for l in layers) / w_sq) if w_sq else 0.0,
        "step0_eval_loss": curve.eval_loss_step0,
        "step0_eval_loss_change": curve.eval_loss_step0 - meta["base_eval_loss"],
        "diverged_step": curve.diverged_step,
        "final_train_loss": curve.train_loss[-1] if curve.train_loss and not curve.diverged_step else math.nan,
        "final_eval_loss": evals[-1] if evals and not curve.diverged_step else math.nan,
        "final_update_norm": curve.update_norm[-1] if curve.update_norm and not curve.diverged_step else math.nan,
        "eval_auc": math.nan if curve.diverged_step else curve.eval_auc(),
        "final_eval_blocks": [] if curve.diverged_step else curve.final_eval_blocks,
        "peak_lr": meta["lr"],
        **stats_info,
        "mean_step_s": sum(curve.step_seconds[1:]) / max(1, len(curve.step_seconds) - 1),
        "init_info": json.dumps(layers[0].info if layers else {}, sort_keys=True),
    }
    return steps + [summary]
