"""A trained adapter as a standard PEFT LoRA for the original, unmodified base model.

A method that rewrites ``W`` (class F, docs/initializers.md §0) trains on
``W_res = W − s·B₀·A₀``; after training the layer computes

    W_res + s·B₁·A₁ = W + s·(B₁·A₁ − B₀·A₀) = W + s·[B₁, −B₀]·[A₁; A₀],

a rank-2r LoRA on ``W`` itself with the same scaling (``lora_alpha`` set so that
``α'/r' = s``, or ``α'/√r' = s`` with rsLoRA). Where ``W`` was never changed (classes Z
and S) the adapter is already plain and is written as is, LoRA-SB's ``R`` folded into A
(``lora_A ← R·A``). A quantized base (class Q, LoftQ) has no plain form: ``W_q − W`` is
the quantization error, of full rank.

The one difference from the trained model is the rounding of ``W_res`` to its dtype: the
plain adapter applies to ``W`` exactly what training applied to ``W_res``, so the two
differ by ``W − s·B₀·A₀ − W_res``, the residual's rounding error (0 for an fp32 base up to
fp32 rounding; tested within the tolerances in ``tests/test_adoption.py``).
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..registry import Invariant
from .layers import full_value, is_distributed, targets


@dataclass(frozen=True)
class PlainAdapter:
    """The plain form of an adapter: its ``LoraConfig`` and PEFT's state-dict tensors."""

    config: Any  # peft.LoraConfig
    tensors: dict[str, torch.Tensor]
    #: per LoRA layer (its path in the base model), the rank it has in the plain form
    ranks: dict[str, int]
    #: the layers written at rank 2r (their method rewrote W)
    combined: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _alpha(scaling: float, rank: int, rslora: bool) -> float:
    """The ``lora_alpha`` that gives ``scaling`` at ``rank``."""
    return scaling * (math.sqrt(rank) if rslora else rank)


def plain_adapter(model, *, adapter_name: str = "default") -> PlainAdapter:
    """The plain form of ``model``'s adapter (the module docstring); every rank of a sharded
    model must call it (the factors are gathered)."""
    from peft import get_peft_model_state_dict

    found = targets(model, adapter_name)
    config = copy.deepcopy(model.peft_config[adapter_name])
    rslora = bool(config.use_rslora)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    combined = []
    for target in found:
        initial = getattr(target.layer, "loram_initial", {}).get(adapter_name)
        if initial is None:
            raise ValueError(f"{target.name} was not initialized by loram_ref.peft.initialize, so its initial factors "
                             "are unknown; an adapter PEFT initialized saves as plain with model.save_pretrained")
        if initial.invariant is Invariant.QUANTIZED:
            raise ValueError(f"{initial.method} replaced the base weights by their quantized form; W_q − W is the "
                             "quantization error, of full rank, so no LoRA on the original base reproduces it: save "
                             "the adapter with model.save_pretrained and ship the quantized base with it")
        with torch.no_grad():
            a1 = full_value(target.layer.lora_A[adapter_name].weight.detach())  # R·A for LoRA-SB
            b1 = full_value(target.layer.lora_B[adapter_name].weight.detach())
            if initial.invariant is Invariant.FUNCTION_PRESERVING:
                a = torch.cat([a1, initial.A.to(a1.dtype)], dim=0)
                b = torch.cat([b1, -initial.B.to(b1.dtype)], dim=1)
                combined.append(target.module)
            else:
                a, b = a1, b1
        factors[target.name] = (a.detach().clone().contiguous(), b.detach().clone().contiguous())
        ranks[target.module] = int(a.shape[0])
        alphas[target.module] = _alpha(float(target.layer.scaling[adapter_name]), int(a.shape[0]), rslora)
    state = {k: full_value(v) for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
             if ".lora_A." not in k and ".lora_B." not in k}
    for name, (a, b) in factors.items():
        state[f"{name}.lora_A.weight"] = a
        state[f"{name}.lora_B.weight"] = b
    common_rank, _ = Counter(ranks.values()).most_common(1)[0]
    common_alpha, _ = Counter(alphas.values()).most_common(1)[0]
    config.r, config.lora_alpha = common_rank, common_alpha
    config.rank_pattern = {re.escape(k): v for k, v in ranks.items() if v != common_rank}
    config.alpha_pattern = {re.escape(k): v for k, v in alphas.items() if v != common_alpha}
    config.init_lora_weights = True  # loading must not re-run an initializer on the base
    for key in ("loftq_config", "eva_config", "corda_config", "lora_ga_config"):
        if hasattr(config, key):
            setattr(config, key, type(getattr(config, key))() if key == "loftq_config" else None)
    return PlainAdapter(config=config, tensors=state, ranks=ranks, combined=tuple(combined))


def save_as_plain_lora(model, path: str | Path, *, adapter_name: str = "default") -> PlainAdapter:
    """Write ``model``'s adapter as a standard PEFT adapter folder for the original base
    model (``PeftModel.from_pretrained(base, path)`` loads it); returns what was written.
    On a sharded model every rank calls it and rank 0 writes."""
    from safetensors.torch import save_file

    plain = plain_adapter(model, adapter_name=adapter_name)
    if any(is_distributed(t.base.weight) for t in targets(model, adapter_name)):
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return plain
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    plain.config.save_pretrained(str(path))
    save_file({k: v.detach().cpu().contiguous() for k, v in plain.tensors.items()},
              str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return plain
