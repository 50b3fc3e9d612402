"""The LoRA layers of a PEFT model as ``initialize`` sees them, and how values go into them.

A layer's frozen weight is read as ``d_out x d_in`` whatever the module stores (a
``fan_in_fan_out`` layer, GPT-2's ``Conv1D``, stores its transpose). Values are copied into
the existing parameters in place, so a parameter keeps its identity (an optimizer built
before ``initialize`` still holds it); a parameter sharded as a DTensor (FSDP2's
``fully_shard``) gets this rank's block of the whole value (:func:`write`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: The prefix PEFT puts before a module's path in the base model.
PEFT_PREFIX = "base_model.model."


class LeftMultiply(nn.Module):
    """The parametrization ``A ↦ R·A`` with R trainable and the original A frozen (LoRA-SB's
    LoRA-XS form, docs/initializers.md §3): PEFT's forward is unchanged."""

    def __init__(self, r: torch.Tensor):
        super().__init__()
        self.R = nn.Parameter(r)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.R @ a


@dataclass
class Target:
    """One LoRA layer of the adapter being initialized."""

    name: str  # the module's path in the PEFT model
    layer: Any  # peft.tuners.lora.Linear
    rank: int
    scaling: float
    transposed: bool  # the base layer stores W transposed (fan_in_fan_out)

    @property
    def module(self) -> str:
        """The module's path in the base model (what ``target_modules`` and patterns match)."""
        return self.name.removeprefix(PEFT_PREFIX)

    @property
    def base(self) -> nn.Module:
        return self.layer.get_base_layer()

    def weight(self) -> torch.Tensor:
        """The frozen weight as ``d_out x d_in`` (a view, never a copy)."""
        w = self.base.weight.detach()
        return w.T if self.transposed else w

    @property
    def shape(self) -> tuple[int, int]:
        w = self.base.weight
        return (int(w.shape[1]), int(w.shape[0])) if self.transposed else (int(w.shape[0]), int(w.shape[1]))


def is_distributed(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def targets(model, adapter: str) -> list[Target]:
    """Every LoRA layer of ``adapter`` in ``model``, checked: a ``peft.PeftModel`` whose adapter
    is a LoRA adapter of linear layers without DoRA. Errors name what to change."""
    from peft import PeftModel
    from peft.tuners.lora import LoraConfig, LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(model, PeftModel):
        raise TypeError(f"model must be a peft.PeftModel (get_peft_model(model, LoraConfig(...))), got "
                        f"{type(model).__name__}")
    if adapter not in model.peft_config:
        raise ValueError(f"adapter_name {adapter!r} is not an adapter of this model; it has: "
                         f"{', '.join(sorted(model.peft_config))}")
    config = model.peft_config[adapter]
    if not isinstance(config, LoraConfig):
        raise ValueError(f"adapter {adapter!r} is a {type(config).__name__}; initialize sets LoRA adapters (LoraConfig)")
    if config.use_dora:
        raise ValueError(f"adapter {adapter!r} uses DoRA (use_dora=True); the initializers set B and A only, not "
                         "DoRA's magnitude vector: use a LoraConfig without use_dora")
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module, LoraLinear):
            raise ValueError(f"{name} is a {type(module).__name__} LoRA layer; initialize sets linear layers only: "
                             "leave it out of target_modules")
        if getattr(module, "lora_magnitude_vector", None) and adapter in module.lora_magnitude_vector:
            raise ValueError(f"{name} has a DoRA magnitude vector for {adapter!r}; use a LoraConfig without use_dora")
        found.append(Target(name=name, layer=module, rank=int(module.r[adapter]),
                            scaling=float(module.scaling[adapter]), transposed=bool(module.fan_in_fan_out)))
    if not found:
        raise ValueError(f"adapter {adapter!r} has no LoRA layers; check the LoraConfig's target_modules")
    return found


def _local_block(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's block of ``full`` for a parameter sharded as a DTensor (``Shard(d)`` splits
    dimension d as ``torch.chunk``: blocks of ceil(size/p); ``Replicate`` keeps it whole)."""
    from torch.distributed.tensor import Shard

    out = full
    mesh = param.device_mesh
    for axis, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            d, world = placement.dim, mesh.size(axis)
            size = out.shape[d]
            chunk = -(-size // world)
            start = min(mesh.get_local_rank(axis) * chunk, size)
            out = out.narrow(d, start, min(start + chunk, size) - start)
    local = param.to_local()
    if tuple(out.shape) != tuple(local.shape):
        raise RuntimeError(f"this rank's block of a {tuple(full.shape)} value is {tuple(out.shape)}, but its shard "
                           f"holds {tuple(local.shape)}")
    return out


def full_value(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor), or ``value`` itself."""
    return value.full_tensor() if is_distributed(value) else value


@torch.no_grad()
def write(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` (the parameter's whole shape, or a DTensor of it) into ``param`` in place,
    cast to the parameter's dtype."""
    if tuple(value.shape) != tuple(param.shape):
        raise RuntimeError(f"a {tuple(value.shape)} value cannot fill a {tuple(param.shape)} parameter")
    if is_distributed(param):
        local = param.to_local()
        if is_distributed(value) and value.placements == param.placements:
            local.copy_(value.to_local())
        else:
            local.copy_(_local_block(param, full_value(value)))
        return
    param.copy_(full_value(value))  # a DTensor value into a plain parameter: the whole of it


@torch.no_grad()
def write_weight(target: Target, value: torch.Tensor) -> None:
    """Replace the frozen weight (``d_out x d_in``) by ``value``, transposed back where the
    module stores it so. A plain parameter takes ``value``'s storage when it is already the
    parameter's dtype, device and layout (the parameter object stays the same, and a
    weight memory-mapped from its checkpoint is not written page by page: 1.0 s of 1.9 s for
    LoRAM on SmolLM2's 210 layers); otherwise the values are copied in place."""
    param = target.base.weight
    stored = value.mT if target.transposed else value
    if rebinds(target, value):
        param.data = stored
        return
    write(param, stored)


def rebinds(target: Target, value: torch.Tensor) -> bool:
    """Whether :func:`write_weight` gives the parameter ``value``'s (``d_out x d_in``) storage:
    then the old weight's values stay intact in any tensor that still refers to them."""
    param = target.base.weight
    value = value.mT if target.transposed else value
    return (not is_distributed(param) and not is_distributed(value) and value.dtype == param.dtype
            and value.device == param.device and value.shape == param.shape and value.is_contiguous()
            and param.is_contiguous())
