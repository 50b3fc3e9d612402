"""The working copy of W that a W-rewriting initializer decomposes and turns into its residual.

Every such method (PiSSA, MiLoRA, OLoRA, CorDA, LoRA-GA) computes ``W_res = W − s·B·A`` in
fp32 (fp64 for an fp64 W) on one copy of W, in place, and casts it to W's dtype once
(docs/initializers.md §2 resolution c): :func:`work_copy` makes the copy, :func:`finish`
casts it back (into W's own storage when the caller allowed ``inplace``) and refuses an fp16
overflow.
"""

from __future__ import annotations

import torch

from .guard import check_residual


def work_copy(weight: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The fp32 matrix to decompose and then turn into the residual.

    A bf16/fp16 ``W`` is up-cast (the copy the algorithm needs). An fp32 or fp64 ``W`` is
    cloned unless the caller allowed ``inplace``, so the function stays pure.
    """
    if weight.dtype in (torch.float32, torch.float64):
        return weight if inplace else weight.clone()
    return weight.to(torch.float32)


def finish(work: torch.Tensor, weight: torch.Tensor, inplace: bool, method: str) -> torch.Tensor:
    """The residual in W's dtype from the ``work`` copy that holds ``W − s·B·A``."""
    if weight.dtype == work.dtype:
        residual = work
    elif inplace:
        residual = weight.copy_(work)  # cast back into W's own storage
    else:
        residual = work.to(weight.dtype)
    if residual.dtype == torch.float16:
        check_residual(residual, method)  # the cast back can overflow fp16: an error, never a silent Inf
    return residual
