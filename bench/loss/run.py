"""The loss benchmark's driver: per initializer, load → (collect) → init → train → rows.

Rows go to ``loss.jsonl`` as each initializer finishes (a crash loses only the run in
progress; a rerun skips initializers already done with the same configuration):
``kind="loss"`` per step (train loss, eval loss every k steps, update magnitude) and one
``kind="loss_summary"`` per initializer (init time, statistics pass time and memory,
step-0 diagnostics, final losses).
"""

from __future__ import annotations

import hashlib
import json
import math
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

from ..environment import environment
from ..results import append_rows, check_writable, export_kind, read_rows, repair
from ..schema import SCHEMA_VERSION
from ..suites import DEFAULT_LOSS_INITIALIZERS
from .apply import apply_initializer, merge_lora_sb
from .collect import collect_statistics
from .data import load_corpus, make_blocks
from .model import TARGETS, ModelSource, local_source, quiet_transformers, smollm2_source
from .train import eval_loss, train


@dataclass
class LossConfig:
    initializers: list[str] = field(default_factory=lambda: list(DEFAULT_LOSS_INITIALIZERS))
    steps: int = 40
    batch_size: int = 4
    seq_len: int = 64
    rank: int = 8
    alpha: float = 8.0
    lr: float = 1e-3
    eval_every: int = 10
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    model_path: Path | None = None
    data: Path | None = None
    threads: int = 0
    sb_samples: int = 8
    da_samples: int = 32  # x seq_len tokens; Z (n x n) needs tokens >= n to be well conditioned
    sb_warmup_ratio: float = 0.02  # LoRA-SB's η_eff = lr / (warmup_ratio · #batches · epochs), the repo's formula
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-initializer kwargs
    save_adapters: Path | None = None  # save each trained adapter (and its residual base weights) here

    def validate(self) -> None:
        for name in self.initializers:
            loram_ref.get_initializer(name)
        for key in ("steps", "batch_size", "seq_len", "rank", "eval_every", "sb_samples", "da_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not (self.lr > 0 and self.alpha > 0):
            raise ValueError("lr and alpha must be > 0")

    def stats_samples(self, kind: StatisticsKind) -> int:
        """How many training blocks the statistics pass of ``kind`` reads (``--sb-samples``, ``--da-samples``)."""
        return {"lora_sb": self.sb_samples, "lora_da": self.da_samples}.get(kind.name, kind.default_samples)

    def key(self, model_name: str, data_sha: str) -> str:
        fields = {k: str(v) for k, v in asdict(self).items() if k not in ("initializers", "threads", "save_adapters")}
        blob = json.dumps({**fields, "model": model_name, "data": data_sha}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _collect(name: str, model, blocks, config: LossConfig, targets: list[str], device: str):
    """The initializer's statistics, by its statistics kind's collector (none for data-free ones)."""
    kind = loram_ref.get_initializer(name).statistics
    if not kind.needed:
        return None
    ids = blocks.train[blocks.order[: config.stats_samples(kind)]].to(device)
    ctx = CollectContext(batch_size=config.batch_size, lr=config.lr, num_train=len(blocks.train),
                         warmup_ratio=config.sb_warmup_ratio)
    return collect_statistics(kind, model, ids, targets, ctx)


def run_loss(config: LossConfig, out: Path, *, progress: bool = True, source: ModelSource | None = None) -> list[dict[str, Any]]:
    """Run every initializer of ``config``; return all rows of ``out/loss.jsonl``."""
    from peft import LoraConfig, get_peft_model

    config.validate()
    quiet_transformers()
    if config.threads:
        torch.set_num_threads(config.threads)
    dtype = getattr(torch, config.dtype)
    source = source or (local_source(config.model_path) if config.model_path else smollm2_source())
    corpus = load_corpus(config.data)
    base, tokenizer = source.load(dtype, config.device)
    smallest = min((min(m.in_features, m.out_features) for n, m in base.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS), default=0)
    if config.rank > smallest:
        raise ValueError(f"--rank {config.rank} exceeds the smallest target layer side of {source.name} ({smallest})")
    ids = tokenizer(corpus.text)["input_ids"]
    blocks = make_blocks(ids, config.seq_len, config.seed)
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)} & set(TARGETS))
    if not targets:
        raise ValueError(f"{source.name} has none of the target linear layers {TARGETS}")
    base_eval = eval_loss(base, blocks.eval.to(config.device), config.batch_size)
    del base

    path = out / "loss.jsonl"
    check_writable(path)
    repair(path)
    rows = read_rows(path)
    key = config.key(source.name, corpus.sha256)
    done = {r["initializer"] for r in rows if r.get("kind") == "loss_summary" and r.get("config_key") == key}
    meta = {
        "config_key": key, "model": source.name, **{f"model_{k}": v for k, v in source.meta.items()},
        "data": corpus.name, "data_sha256": corpus.sha256, "train_blocks": len(blocks.train),
        "eval_blocks": len(blocks.eval), "tokens": len(ids), "steps": config.steps, "batch_size": config.batch_size,
        "seq_len": config.seq_len, "rank": config.rank, "alpha": config.alpha, "lr": config.lr, "seed": config.seed,
        "device": config.device, "dtype": config.dtype, "threads": torch.get_num_threads(), "targets": ",".join(targets),
        "base_eval_loss": base_eval,
    }
    for name in config.initializers:
        if name in done:
            print(f"loss: {name} already done for this configuration, skipped", file=sys.stderr)
            continue
        model, _ = source.load(dtype, config.device)
        collected = _collect(name, model, blocks, config, targets, config.device)
        for p in model.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets, lora_dropout=0.0,
                          init_lora_weights=False)
        model = get_peft_model(model, lora)
        t0 = time.perf_counter()
        layers = apply_initializer(model, name, seed=config.seed, stats=collected.stats if collected else None,
                                   options=config.options.get(name))
        init_seconds = time.perf_counter() - t0
        torch.manual_seed(config.seed)
        bar = tqdm(total=config.steps, desc=f"loss {name}", unit="step", disable=not progress, dynamic_ncols=True)
        curve = train(model, blocks, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                      eval_every=config.eval_every, device=config.device,
                      on_step=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
        bar.close()
        if config.save_adapters is not None:
            _save(model, config.save_adapters / name)
        run_rows = _rows(name, meta, curve, layers, init_seconds, collected, model)
        append_rows(path, run_rows)  # one write: a run's steps and summary land together
        rows.extend(run_rows)
        del model
    export_kind(rows, out, "loss")
    export_kind(rows, out, "loss_summary")
    return rows


def _save(model, folder: Path) -> None:
    """A plain PEFT adapter (LoRA-SB's R folded into A) plus, where the initializer rewrote
    W, the residual base weights it must be loaded onto (``residual_base.safetensors``)."""
    from safetensors.torch import save_file

    merge_lora_sb(model)
    model.save_pretrained(folder)
    base = {k.replace(".base_layer", ""): v.detach().contiguous() for k, v in model.get_base_model().state_dict().items()
            if "lora_" not in k and k.endswith(".base_layer.weight")}
    save_file(base, folder / "residual_base.safetensors")


def _rows(name, meta, curve, layers, init_seconds, collected, model) -> list[dict[str, Any]]:
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
        "final_train_loss": curve.train_loss[-1],
        "final_eval_loss": evals[-1] if evals else math.nan,
        "final_update_norm": curve.update_norm[-1],
        "mean_step_s": sum(curve.step_seconds[1:]) / max(1, len(curve.step_seconds) - 1),
        "init_info": json.dumps(layers[0].info if layers else {}, sort_keys=True),
    }
    return steps + [summary]
