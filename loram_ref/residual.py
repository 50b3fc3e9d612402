"""The residual ``W_res = W − s·B·A`` of a W-rewriting initializer.

Every such method (PiSSA, MiLoRA, OLoRA, CorDA, LoRA-GA) computes ``W_res`` in fp32 (fp64 for
an fp64 W) and casts it to W's dtype once (docs/initializers.md §2 resolution c). A method
whose decomposition needs all of W in fp32 (a full SVD, a QR of W) works on one copy of it:
:func:`work_copy` makes the copy, :func:`finish` casts it back (into W's own storage when the
caller allowed ``inplace``). A method that only multiplies by W (the randomized SVD) never
needs the copy: :func:`streamed_residual` computes the same residual one up-cast row block at
a time. Both refuse an fp16 overflow.
"""

from __future__ import annotations

import torch

from .guard import check_residual
from .stream import RowStream


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


def streamed_residual(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float, inplace: bool,
                      method: str, block_elements: int | None = None) -> torch.Tensor:
    """``W_res = W − s·B·A`` in W's dtype, computed in fp32 (fp64) one row block at a time.

    Per entry the arithmetic of :func:`work_copy` + ``addmm_`` + :func:`finish`: the block is
    up-cast (exactly), ``s·B_b·A`` is subtracted in fp32 with ``B`` and ``A`` in fp32, and
    the result is rounded to W's dtype once. Extra memory: one block per worker
    (:class:`loram_ref.stream.RowStream`), not an fp32 copy of W. An fp32/fp64 ``W`` takes
    one in-place ``addmm_`` (on a clone unless ``inplace``). ``b``, ``a``: the factors in
    the compute dtype.
    """
    stream = RowStream(weight, block_elements)
    if weight.dtype == stream.dtype:
        residual = weight if inplace else weight.clone()
        return residual.addmm_(b, a, alpha=-scaling)
    residual = weight if inplace else torch.empty_like(weight)

    def body(_: int, share) -> None:
        for start, block in share:
            rows = block.shape[0]
            block.addmm_(b[start : start + rows], a, alpha=-scaling)  # in the worker's up-cast buffer
            residual[start : start + rows].copy_(block)  # rounded to W's dtype once

    stream.run(body)
    if residual.dtype == torch.float16:
        check_residual(residual, method)  # the cast back can overflow fp16: an error, never a silent Inf
    return residual
