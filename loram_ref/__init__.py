"""Reference implementations of LoRA initializers, each a pure function on one frozen weight.

Every initializer has the signature ``fn(weight, rank, scaling=1.0, *, ...) -> LoraInit``
and is registered by name in :data:`INITIALIZERS`. Formulas follow
``shared/spec/initializers.md`` (cited as "spec §N" in the docstrings).

>>> import torch, loram_ref
>>> W = torch.randn(64, 32)
>>> init = loram_ref.initialize("loram_dst", W, rank=8)
>>> torch.allclose(init.effective_weight(W), W, atol=1e-5)
True
"""

from __future__ import annotations

import torch

from . import lora_da, lora_sb, loram, noise, pissa  # noqa: F401  (registration side effect)
from .bases import dst_basis, random_orthogonal_basis
from .linalg import principal_angles, randomized_svd
from .collect import CollectContext
from .registry import (
    FULL_SVD,
    INITIALIZERS,
    INPUT_SPACE,
    PASSES,
    CostClass,
    InitializerSpec,
    Invariant,
    PublishedScaling,
    Statistics,
    StatisticsKind,
    get_initializer,
)
from .result import LoraInit
from .stats import LoraDAStats, LoraSBStats

__all__ = [
    "FULL_SVD",
    "INITIALIZERS",
    "INPUT_SPACE",
    "PASSES",
    "CollectContext",
    "CostClass",
    "InitializerSpec",
    "Invariant",
    "PublishedScaling",
    "LoraDAStats",
    "LoraInit",
    "LoraSBStats",
    "Statistics",
    "StatisticsKind",
    "dst_basis",
    "get_initializer",
    "initialize",
    "principal_angles",
    "random_orthogonal_basis",
    "randomized_svd",
]


def initialize(name: str, weight: torch.Tensor, rank: int, scaling: float = 1.0, **kwargs) -> LoraInit:
    """Run the initializer registered as ``name`` on ``weight``."""
    return get_initializer(name).fn(weight, rank, scaling, **kwargs)
