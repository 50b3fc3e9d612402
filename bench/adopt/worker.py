"""``python -m bench.adopt.worker SPEC.json``: one adoption measurement in a fresh process.

``mode="ours"``: ``get_peft_model(..., init_lora_weights=False)`` then
``loram_ref.peft.initialize`` (its statistics pass included for a data-aware method);
``mode="peft"``: PEFT's own path to the same method, ``get_peft_model`` with its
``init_lora_weights`` value, after ``preprocess_corda`` / ``preprocess_loraga`` or followed
by ``initialize_lora_eva_weights`` for the methods PEFT feeds data. Each region is timed
once with its peak RSS above the entry (the model is loaded before it). Where PEFT's own
path cannot run here (its LoftQ quantizes with bitsandbytes on CUDA or XPU), the row says
``not_run`` with PEFT's reason.

With ``plain=True`` (ours), the adapter then trains ``train_steps`` AdamW steps and is
saved with ``save_as_plain_lora``; a fresh base model loads it, and the row records the
plain adapter's bytes, the regular adapter's and the rewritten base weights' bytes, and the
largest logits difference from the trained model.

The model's parameters are made resident before any measurement (a checkpoint loaded with
memory mapping would otherwise count as new memory when first read). The row is printed as
the last line of stdout, as JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.adopt.models import load_model, train_steps
from bench.core.measure import cpu_peak


def _config(spec: dict, init: Any, **extra):
    from peft import LoraConfig

    return LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=spec["targets"], lora_dropout=0.0,
                      init_lora_weights=init, **extra)


def _peft(spec: dict, model, ids: torch.Tensor | None) -> dict[str, Any]:
    """PEFT's own path for the method, its data-aware ones chosen by the statistics they read
    (PEFT's CorDA reads the input covariance, LoRA-GA the gradient, EVA the input moments)
    and LoftQ by its quantized base (NF4, PEFT's default); returns the row's fields."""
    from peft import get_peft_model

    import loram_ref
    from loram_ref import Statistics

    spec_ = loram_ref.get_initializer(spec["method"])
    value, kind = spec_.peft_init, spec_.statistics
    batches = [] if ids is None else [ids[i:i + spec["batch_size"]] for i in range(0, len(ids), spec["batch_size"])]
    if kind is Statistics.INPUT_COVARIANCE:
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config = _config(spec, value, corda_config=CordaConfig(corda_method="ipm"))
        preprocess_corda(model, config, run_model=lambda: [model(input_ids=ids[i:i + 1]) for i in range(len(ids))])
        return {"peft_model": get_peft_model(model, config)}
    if kind is Statistics.GRADIENT:
        from peft import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config = _config(spec, value, lora_ga_config=LoraGAConfig())

        def train_step():
            for batch in batches:
                model(input_ids=batch, labels=batch).loss.backward()

        preprocess_loraga(model, config, train_step)
        return {"peft_model": get_peft_model(model, config)}
    if kind is Statistics.INPUT_MOMENTS:
        from peft import EvaConfig
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        peft_model = get_peft_model(model, _config(spec, value, eva_config=EvaConfig(rho=1.0)))
        initialize_lora_eva_weights(peft_model, dataloader=batches, forward_fn=lambda m, b: m(input_ids=b),
                                    prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None,
                                    show_progress_bar=False)
        return {"peft_model": peft_model}
    if spec_.invariant is loram_ref.Invariant.QUANTIZED:
        from peft import LoftQConfig

        return {"peft_model": get_peft_model(model, _config(spec, value, loftq_config=LoftQConfig(loftq_bits=4)))}
    return {"peft_model": get_peft_model(model, _config(spec, value))}


def _ours(spec: dict, model, ids: torch.Tensor | None) -> dict[str, Any]:
    from peft import get_peft_model

    from loram_ref.peft import initialize

    peft_model = get_peft_model(model, _config(spec, False))
    t0 = time.perf_counter()
    report = initialize(peft_model, spec["method"], data=ids, batch_size=spec["batch_size"], lr=spec["lr"],
                        seed=spec.get("seed", 0))
    return {"peft_model": peft_model, "initialize_seconds": time.perf_counter() - t0,
            "stats_seconds": report.stats_seconds, "init_layer_seconds": sum(l.seconds for l in report.layers),
            "invariant": report.invariant.value, "invariant_holds": report.invariant_holds,
            "max_invariant_error": report.max_invariant_error, "layers": len(report.layers)}


def _plain(spec: dict, peft_model, ids: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    from peft import PeftModel

    from loram_ref.peft import save_as_plain_lora

    train_steps(peft_model, ids, spec.get("train_steps", 2), spec.get("train_lr", 1e-4))
    probe = ids[:2]
    with torch.no_grad():
        trained = peft_model(input_ids=probe).logits.float()
    rewritten = sum(m.get_base_layer().weight.numel() * m.get_base_layer().weight.element_size()
                    for _, m in peft_model.named_modules() if hasattr(m, "loram_initial")
                    and m.loram_initial["default"].invariant.rewrites_weight)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters()
                        if ".lora_A." in n or ".lora_B." in n)
    with tempfile.TemporaryDirectory() as folder:
        plain = save_as_plain_lora(peft_model, folder)
        fresh = PeftModel.from_pretrained(load_model(spec["model"], dtype), folder).eval()
        with torch.no_grad():
            got = fresh(input_ids=probe).logits.float()
    return {"plain_bytes": plain.nbytes, "plain_rank": plain.config.r, "adapter_bytes": adapter_bytes,
            "rewritten_base_bytes": rewritten, "plain_logits_max_abs_diff": float((got - trained).abs().max()),
            "logits_max_abs": float(trained.abs().max()), "train_steps": spec.get("train_steps", 2)}


def measure(spec: dict) -> dict[str, Any]:
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    dtype = getattr(torch, spec.get("dtype", "float32"))
    ids = torch.load(spec["data"]) if spec.get("data") else None
    model = load_model(spec["model"], dtype)
    for p in model.parameters():
        p.requires_grad_(False)
        p.data = p.data.clone()  # resident before the measurement: reading a memory-mapped weight is no allocation
    row = {"kind": "adopt_cost", "method": spec["method"], "mode": spec["mode"], "model": spec["model"],
           "rank": spec["rank"], "alpha": spec["alpha"], "dtype": spec.get("dtype", "float32"),
           "threads": torch.get_num_threads(), "targets": ",".join(spec["targets"])}
    t0 = time.perf_counter()
    try:
        with cpu_peak() as peak:
            found = (_ours if spec["mode"] == "ours" else _peft)(spec, model, ids)
    except Exception as exc:  # PEFT's own path refusing this machine (LoftQ needs bitsandbytes on a GPU)
        if spec["mode"] == "ours":
            raise
        return {**row, "status": "not_run", "reason": f"PEFT: {type(exc).__name__}: {exc}"[:500]}
    row["seconds"] = time.perf_counter() - t0
    row["peak_cpu_extra_bytes"] = peak.extra_bytes
    row["peak_method"] = peak.method
    peft_model = found.pop("peft_model")
    row.update(found)
    if spec.get("plain") and spec["mode"] == "ours" and ids is not None:
        import loram_ref

        if loram_ref.get_initializer(spec["method"]).invariant is loram_ref.Invariant.QUANTIZED:
            row["plain_form"] = "none: the base is quantized (W_q − W has full rank)"
        else:
            row.update(_plain(spec, peft_model, ids, dtype))
    row["status"] = "ok"
    return row


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.adopt.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    print(json.dumps(measure(spec), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
