"""Reference implementations of LoRA initializers, each a pure function on one frozen weight.

Every initializer has the signature ``fn(weight, rank, scaling=1.0, *, ...) -> LoraInit``
and is registered by name in :data:`INITIALIZERS` (``@register`` in its own module). Every
module of this package is imported here, found on disk, so a new initializer's module
registers by existing. Formulas, invariants and the official codes' behaviour are in
``docs/initializers.md``, cited as "§N" in the docstrings.

>>> import torch, loram_ref
>>> W = torch.randn(64, 32)
>>> init = loram_ref.initialize("loram_dst", W, rank=8)
>>> torch.allclose(init.effective_weight(W), W, atol=1e-5)
True
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from .bases import dst_basis, random_orthogonal_basis
from .linalg import principal_angles, randomized_svd
from .statistics import (
    CollectContext,
    GradientStats,
    InputCovarianceStats,
    InputMomentsStats,
    LoraDAStats,
    LoraSBStats,
)
from .registry import (
    FULL_SVD,
    HARNESS_ROLES,
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

#: The modules imported for their registrations: every module of this package (the
#: subpackages, ``sharded`` and ``statistics``, hold no single-process initializer).
MODULES = tuple(info.name for info in pkgutil.iter_modules(__path__) if not info.ispkg)
for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "FULL_SVD",
    "HARNESS_ROLES",
    "INITIALIZERS",
    "INPUT_SPACE",
    "PASSES",
    "CollectContext",
    "CostClass",
    "InitializerSpec",
    "Invariant",
    "PublishedScaling",
    "GradientStats",
    "InputCovarianceStats",
    "InputMomentsStats",
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
