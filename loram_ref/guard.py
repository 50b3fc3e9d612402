"""What every initializer does around its algorithm: hostile inputs in, non-finite output out.

:func:`guard` wraps each registered function (the registry applies it), so no method can
forget a check:

* ``rank`` and ``scaling`` may be any integer / real number type (``numpy.int64(4)``,
  ``numpy.float32(2)``); they are turned into ``int`` and ``float``;
* a meta tensor (shape without data) is refused with advice, before any kernel runs;
* ``W`` is used through ``weight.detach()`` under ``torch.no_grad()``: a leaf that
  requires grad may be initialized in place (its data is written, as PEFT does through
  ``.data``) and no result stays attached to an autograd graph;
* the factors that come back are checked to be finite; a method whose residual can
  overflow checks it itself (fused into its last pass), see :func:`check_residual`.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable

import torch

from .result import LoraInit
from .validation import is_finite


def _as_int(value: object) -> object:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value  # the method's own check names the parameter and the type


def _as_float(value: object) -> object:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def check_finite_result(init: LoraInit, dtype: torch.dtype) -> LoraInit:
    """Refuse factors with NaN or Inf (they are small: r·(m+n) entries; one sum each in the
    common case, :func:`loram_ref.validation.is_finite`)."""
    for label, tensor in (("A", init.A), ("B", init.B), ("R", init.R)):
        if tensor is not None and not is_finite(tensor if tensor.dim() == 2 else tensor.reshape(1, -1)):
            raise ValueError(f"{init.method} produced non-finite {label} for a {dtype} weight; "
                             + _advice(dtype))
    return init


def _advice(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "float16 overflows above 65504: initialize in bfloat16 or float32 and cast afterwards"
    return "check the weight and statistics for extreme values"


def check_residual(residual: torch.Tensor, method: str) -> None:
    """Raise if the residual ``W - s·B·A`` holds NaN or Inf (an overflow of ``W``'s dtype);
    one read pass in the common case (``validation.is_finite``)."""
    if not is_finite(residual):
        raise ValueError(f"{method}: the residual W - s·B·A overflows {residual.dtype}; " + _advice(residual.dtype))


def guard(fn: Callable[..., LoraInit]) -> Callable[..., LoraInit]:
    """The registered form of an initializer function (see the module docstring)."""

    @functools.wraps(fn)
    def guarded(weight, rank, scaling=1.0, *args, **kwargs) -> LoraInit:
        if isinstance(weight, torch.Tensor):
            if weight.is_meta:
                raise ValueError("weight is a meta tensor (a shape without data): materialize it first, e.g. load "
                                 "the checkpoint or model.to_empty(device=...) and fill it, then initialize")
            weight = weight.detach()
        with torch.no_grad():
            init = fn(weight, _as_int(rank), _as_float(scaling), *args, **kwargs)
        return check_finite_result(init, weight.dtype if isinstance(weight, torch.Tensor) else torch.float32)

    return guarded
