"""Noise-zeros initializers: standard LoRA as PEFT does it (docs/initializers.md §1; Hu et al. 2021, §4.1)."""

from __future__ import annotations

import math

import torch

from .registry import Invariant, PublishedScaling, register
from .result import LoraInit
from .work import factors_only
from .validation import check_inputs, resolve_generator


def _noise_zeros(
    name: str,
    weight: torch.Tensor,
    rank: int,
    scaling: float,
    generator: torch.Generator | None,
    seed: int,
    check_input: bool,
    fill_a,
) -> LoraInit:
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    gen = resolve_generator(generator, weight.device, seed)
    m, n = weight.shape
    # PEFT draws into a freshly created fp32 nn.Linear, then casts the adapter to the
    # base dtype (_move_adapter_to_device_of_base_layer): draw in fp32, round once.
    a = torch.empty(rank, n, dtype=torch.float32, device=weight.device)
    fill_a(a, gen)
    b = torch.zeros(m, rank, dtype=weight.dtype, device=weight.device)
    return LoraInit(method=name, A=a.to(weight.dtype), B=b, scaling=scaling)


@register(
    "noise_zeros",
    harness=("generator", "check_input"),
    peft_name="True (the default)",
    work=factors_only,
    invariant=Invariant.ZERO_PRODUCT,
    reads_weight=False,
    published=PublishedScaling(alpha=8.0, source="PEFT's default lora_alpha = 8 (s = 8/r)"),
    paper="Hu et al. 2021, LoRA (arXiv 2106.09685); PEFT init_lora_weights=True",
    summary="A ~ Kaiming-uniform(a=√5) = U(±1/√d_in), B = 0",
)
def noise_zeros(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
    check_input: bool = False,
) -> LoraInit:
    """PEFT's default LoRA init (``init_lora_weights=True``), docs/initializers.md §1.

    ``A_ij ~ U(-b, b)`` with ``b = gain·√3/√d_in`` and ``gain = √(2/(1+5))`` (Kaiming
    uniform, negative slope √5), which is ``b = 1/√d_in``; ``B = 0``. Invariant (Z):
    ``B·A = 0``; ``W`` is never read except by the optional finiteness check.

    Args:
        weight: frozen ``d_out x d_in`` weight; only its shape, dtype and device are used.
        rank: adapter rank ``1 <= r <= min(d_out, d_in)``.
        scaling: ``s``; recorded, it does not change the factors.
        generator: random source; ``None`` means a fresh generator seeded with ``seed``.
            Seeded like the global RNG, it reproduces PEFT's ``reset_lora_parameters``.
        check_input: reject NaN/Inf in ``W`` (one pass over ``W``). Off by default: the
            method never reads ``W``, so a scan would cost a pass over the largest tensor
            for nothing (PEFT does not scan either).
    """
    return _noise_zeros(
        "noise_zeros", weight, rank, scaling, generator, seed, check_input,
        lambda a, g: torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g),
    )


@register(
    "gaussian",
    harness=("generator", "check_input"),
    peft_name='"gaussian"',
    work=factors_only,
    invariant=Invariant.ZERO_PRODUCT,
    reads_weight=False,
    published=PublishedScaling(alpha=8.0, source="PEFT's default lora_alpha = 8 (s = 8/r)"),
    paper="Hu et al. 2021, LoRA (arXiv 2106.09685); PEFT init_lora_weights='gaussian'",
    summary="A ~ N(0, (1/r)²) (std 1/r, as PEFT), B = 0",
)
def gaussian(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
    check_input: bool = False,
) -> LoraInit:
    """PEFT's ``init_lora_weights="gaussian"``, docs/initializers.md §1: ``A_ij ~ N(0, σ²)``, ``B = 0``.

    Decision (docs/initializers.md §1 ambiguity): ``σ = 1/r`` exactly as PEFT, i.e. variance ``1/r²``,
    not the ``N(0, 1/r)`` some write-ups state. Invariant (Z). Arguments as
    :func:`noise_zeros`.
    """
    return _noise_zeros(
        "gaussian", weight, rank, scaling, generator, seed, check_input,
        lambda a, g: torch.nn.init.normal_(a, std=1.0 / rank, generator=g),
    )
