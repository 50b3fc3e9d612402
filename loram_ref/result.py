"""The one result type every initializer returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LoraInit:
    """Adapter factors produced by one initializer for one frozen weight ``W`` (m x n).

    Orientation follows PEFT (docs/initializers.md §0): ``A`` is ``lora_A.weight`` (r x n), ``B`` is
    ``lora_B.weight`` (m x r) and the effective weight is ``W_res + s·B·A`` (or
    ``W_res + s·B·R·A`` for LoRA-SB).

    Attributes:
        method: registry name of the initializer that made this result.
        A: r x n input-side factor.
        B: m x r output-side factor.
        scaling: the scaling ``s`` the factors were built for.
        R: r x r middle factor (LoRA-SB only, the trainable part), else ``None``.
        residual: the new frozen weight ``W_res`` when the method rewrites ``W``;
            ``None`` when ``W`` is left unchanged (zero-product and shifted methods).
        info: method-specific facts worth recording (solver used, fallbacks, gains).
    """

    method: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    R: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def product(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``B·A`` (or ``B·R·A``) in ``dtype``, without the scaling."""
        B = self.B.to(dtype)
        if self.R is not None:
            B = B @ self.R.to(dtype)
        return B @ self.A.to(dtype)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The adapter's contribution ``s·B·A`` (``s·B·R·A``) to the effective weight."""
        return self.product(dtype).mul_(self.scaling)

    def effective_weight(self, weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_res + s·B·A``, where ``W_res`` is ``residual`` or, if unchanged, ``weight``."""
        base = self.residual if self.residual is not None else weight
        return base.to(dtype) + self.delta(dtype)
