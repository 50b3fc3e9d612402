"""The loss benchmark's driver: per (seed, initializer, lr), load → init → train → rows.

Rows go to ``loss.jsonl`` as each run finishes (a crash loses only the run in progress;
a rerun skips the (initializer, lr, seed) runs already done with the same configuration):
``kind="loss"`` per step (train loss, eval loss every k steps, update magnitude) and one
``kind="loss_summary"`` per run (init time, statistics pass time and memory, step-0
diagnostics, final losses, area under the eval curve). At the end the verdict over seeds
(``bench.loss.verdict``) is written to ``loss_stats.csv``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import loram_ref
from loram_ref import CollectContext, StatisticsKind

from ..checks import check_threads
from ..environment import environment
from ..results import append_rows, check_writable, export_kind, read_rows, repair
from ..schema import SCHEMA_VERSION
from ..suites import DEFAULT_LOSS_INITIALIZERS, check_seeds_and_lrs
from .apply import apply_initializer, lora_layers, merge_lora_sb
from .collect import Collected, collect_statistics
from .data import Blocks, load_corpus, make_blocks
from .model import TARGETS, ModelSource, local_source, quiet_transformers, smollm2_source
from .train import eval_loss, train
from .verdict import write_verdict


#: ``--scaling``: every initializer at the shared ``alpha``, or each at its published one.
SCALINGS = ("shared", "published")
#: ``--autocast``: bf16 autocast where the processor has bf16 arithmetic, or always / never.
AUTOCASTS = ("auto", "bfloat16", "none")


@dataclass
class LossConfig:
    """One loss experiment: a grid of (initializer, learning rate, seed) runs that share
    everything else. A run is identified by ``key()`` plus its (initializer, lr, seed)."""

    initializers: list[str] = field(default_factory=lambda: list(DEFAULT_LOSS_INITIALIZERS))
    seeds: list[int] = field(default_factory=lambda: [0])
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    steps: int = 40
    batch_size: int = 4
    seq_len: int = 64
    rank: int = 8
    alpha: float = 8.0
    scaling: str = "shared"  # "published": each initializer's PublishedScaling from the registry
    eval_every: int = 5
    eval_blocks: int = 8  # a fixed held-out subset, the same for every run: bounded eval cost
    device: str = "cpu"
    dtype: str = "float32"
    autocast: str = "auto"
    model_path: Path | None = None
    data: Path | None = None
    threads: int = 0
    sb_samples: int = 8
    da_samples: int = 32  # x seq_len tokens; Z (n x n) needs tokens >= n to be well conditioned
    sb_warmup_ratio: float = 0.02  # LoRA-SB's η_eff = lr / (warmup_ratio · #batches · epochs), the repo's formula
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-initializer kwargs
    save_adapters: Path | None = None  # save each trained adapter (and its residual base weights) here

    def validate(self) -> None:
        if not self.initializers:
            raise ValueError("--initializers is empty: name at least one (see `loram-bench list`)")
        for name in self.initializers:
            loram_ref.get_initializer(name)
        for key in ("steps", "batch_size", "seq_len", "rank", "eval_every", "eval_blocks", "sb_samples", "da_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be an integer >= 1, got {value!r}")
        check_seeds_and_lrs(self.seeds, self.lrs)
        if len(set(self.initializers)) != len(self.initializers):
            raise ValueError(f"--initializers lists a value twice: {self.initializers}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--alpha must be finite and > 0, got {self.alpha}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"--scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if self.autocast not in AUTOCASTS:
            raise ValueError(f"--autocast must be one of {', '.join(AUTOCASTS)}, got {self.autocast!r}")
        check_threads(self.threads, device="cpu" if self.device == "cpu" else "cuda")

    def stats_samples(self, kind: StatisticsKind) -> int:
        """How many training blocks the statistics pass of ``kind`` reads (``--sb-samples``, ``--da-samples``)."""
        return {"lora_sb": self.sb_samples, "lora_da": self.da_samples}.get(kind.name, kind.default_samples)

    def lora_setup(self, name: str) -> tuple[float, bool]:
        """``(lora_alpha, use_rslora)`` of ``name``'s runs: the shared alpha, or its published setup."""
        if self.scaling == "shared":
            return float(self.alpha), False
        published = loram_ref.get_initializer(name).published
        return published.lora_alpha(self.rank), published.rslora

    def autocast_dtype(self) -> str:
        """The resolved ``--autocast``: "bfloat16" or "none" (``auto``: bf16 where the hardware has it)."""
        if self.autocast != "auto":
            return self.autocast
        if self.dtype != "float32":
            return "none"
        return "bfloat16" if bf16_supported(self.device) else "none"

    def key(self, model_name: str, data_sha: str) -> str:
        """What every run of the grid shares (not the initializer, lr or seed: those name the run)."""
        skip = ("initializers", "seeds", "lrs", "threads", "save_adapters", "autocast")
        fields = {k: str(v) for k, v in asdict(self).items() if k not in skip}
        fields["autocast"] = self.autocast_dtype()
        blob = json.dumps({**fields, "model": model_name, "data": data_sha}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def bf16_supported(device: str) -> bool:
    """Whether ``device`` computes in bf16 natively (CPU: AVX512-BF16 or AMX, via oneDNN)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def run_id(initializer: str, lr: float, seed: int) -> tuple[str, float, int]:
    """A run's identity within its configuration."""
    return initializer, float(lr), int(seed)


@dataclass
class _Statistics:
    """One statistics pass, shared by every learning rate of one seed."""

    collected: Collected
    lr: float  # the learning rate it was collected at (LoRA-SB's η depends on it)


def _collect(kind: StatisticsKind, source: ModelSource, blocks: Blocks, config: LossConfig, targets: list[str]
             ) -> _Statistics:
    """``kind``'s statistics pass on a fresh base model, over the seed's first training blocks."""
    dtype = getattr(torch, config.dtype)
    model, _ = source.load(dtype, config.device)
    ids = blocks.train[blocks.order[: config.stats_samples(kind)]].to(config.device)
    lr = config.lrs[0]
    ctx = CollectContext(batch_size=config.batch_size, lr=lr, num_train=len(blocks.train),
                         warmup_ratio=config.sb_warmup_ratio)
    return _Statistics(collect_statistics(kind, model, ids, targets, ctx), lr)


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
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)} & set(TARGETS))
    if not targets:
        raise ValueError(f"{source.name} has none of the target linear layers {TARGETS}")

    path = out / "loss.jsonl"
    check_writable(path)
    repair(path)
    rows = read_rows(path)
    key = config.key(source.name, corpus.sha256)
    done = {run_id(r["initializer"], r["lr"], r["seed"]) for r in rows
            if r.get("kind") == "loss_summary" and r.get("config_key") == key}
    grid = [(seed, name, lr) for seed in config.seeds for name in config.initializers for lr in config.lrs]
    pending = [g for g in grid if run_id(g[1], g[2], g[0]) not in done]
    if len(pending) < len(grid):
        print(f"loss: {len(grid) - len(pending)} of {len(grid)} runs already done for this configuration, skipped",
              file=sys.stderr)
    base_eval = eval_loss(base, split.eval.to(config.device), config.batch_size, amp) if pending else math.nan
    del base
    meta = {
        "config_key": key, "model": source.name, **{f"model_{k}": v for k, v in source.meta.items()},
        "data": corpus.name, "data_sha256": corpus.sha256, "train_blocks": len(split.train),
        "eval_blocks": len(split.eval), "tokens": len(ids), "steps": config.steps, "batch_size": config.batch_size,
        "seq_len": config.seq_len, "rank": config.rank, "scaling_mode": config.scaling, "eval_every": config.eval_every,
        "device": config.device, "dtype": config.dtype, "autocast": autocast, "threads": torch.get_num_threads(),
        "targets": ",".join(targets), "base_eval_loss": base_eval, **_omp_settings(),
    }
    started = time.perf_counter()
    cached: tuple[tuple[str, int], _Statistics] | None = None
    for index, (seed, name, lr) in enumerate(pending):
        blocks = split.for_seed(seed)
        kind = loram_ref.get_initializer(name).statistics
        statistics = None
        if kind.needed:
            if cached is None or cached[0] != (kind.name, seed):
                cached = None  # one pass in memory at a time (seeds are the outer loop)
                cached = ((kind.name, seed), _collect(kind, source, blocks, config, targets))
            statistics = cached[1]
        alpha, rslora = config.lora_setup(name)
        run_meta = {**meta, "lr": float(lr), "seed": int(seed), "alpha": alpha, "use_rslora": rslora}
        label = f"loss {name} lr={lr:g} seed={seed} [{index + 1}/{len(pending)}]"
        run_rows = _one_run(name, lr, seed, source, blocks, config, statistics, amp, run_meta, label, progress, targets)
        append_rows(path, run_rows)  # one write: a run's steps and summary land together
        rows.extend(run_rows)
        elapsed = time.perf_counter() - started
        left = elapsed / (index + 1) * (len(pending) - index - 1)
        summary = run_rows[-1]
        outcome = (f"diverged at step {summary['diverged_step']}" if summary["diverged_step"]
                   else f"final eval loss {summary['final_eval_loss']:.4f}")
        print(f"{label}: {outcome}, {summary['mean_step_s']:.2f} s/step; "
              f"{elapsed:.0f} s so far, about {left:.0f} s left", file=sys.stderr, flush=True)
    export_kind(rows, out, "loss")
    export_kind(rows, out, "loss_summary")
    write_verdict(rows, out)
    return rows


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
    bar = tqdm(total=config.steps, desc=label, unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    curve = train(model, blocks, steps=config.steps, batch_size=config.batch_size, lr=lr,
                  eval_every=config.eval_every, device=config.device, autocast=amp,
                  on_step=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
    bar.close()
    if config.save_adapters is not None:
        _save(model, config.save_adapters / f"{name}-lr{lr:g}-seed{seed}")
    stats_info = {}
    if statistics is not None:
        stats_info = {"stats_collected_lr": statistics.lr, "stats_derived": statistics.lr != lr,
                      **{f"stats_{k}": v for k, v in (stats_meta or {}).items() if isinstance(v, (int, float))}}
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
    """A plain PEFT adapter (LoRA-SB's R folded into A) plus, where the initializer rewrote
    W, the residual base weights it must be loaded onto (``residual_base.safetensors``)."""
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
    common = {"schema_version": SCHEMA_VERSION, "initializer": name, "run_uid": uuid.uuid4().hex[:12], **meta}
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
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "init_seconds": init_seconds,
        "init_layer_seconds": sum(l.seconds for l in layers),
        "layers": len(layers),
        "trainable_params": trainable,
        "stats_seconds": collected.seconds if collected else 0.0,
        "stats_samples": collected.samples if collected else 0,
        "stats_peak_cpu_extra_bytes": collected.peak_cpu_extra_bytes if collected else 0,
        "stats_peak_gpu_allocated_bytes": collected.peak_gpu_allocated_bytes if collected else 0,
        # step-0 diagnostics (spec §9): ‖W_eff - W‖_F over all layers and ‖s·B·A‖_F/‖W‖_F
        "step0_shift_norm": math.sqrt(sum(l.shift_norm**2 for l in layers)),
        "step0_delta_rel_norm": math.sqrt(sum(l.delta_norm**2 for l in layers) / w_sq) if w_sq else 0.0,
        "step0_eval_loss": curve.eval_loss_step0,
        "step0_eval_loss_change": curve.eval_loss_step0 - meta["base_eval_loss"],
        "diverged_step": curve.diverged_step,
        "final_train_loss": curve.train_loss[-1] if curve.train_loss and not curve.diverged_step else math.nan,
        "final_eval_loss": evals[-1] if evals and not curve.diverged_step else math.nan,
        "final_update_norm": curve.update_norm[-1] if curve.update_norm and not curve.diverged_step else math.nan,
        "eval_auc": math.nan if curve.diverged_step else curve.eval_auc(),
        **stats_info,
        "mean_step_s": sum(curve.step_seconds[1:]) / max(1, len(curve.step_seconds) - 1),
        "init_info": json.dumps(layers[0].info if layers else {}, sort_keys=True),
    }
    return steps + [summary]
