"""What an initialization did to one layer, from the values the model now holds.

For ``W`` the weight before, ``W'`` the stored weight after and ``s·B·A`` the stored
adapter (all read in their stored dtypes):

* ``output_shift = ‖W' + s·B·A − W‖_F``: how far the layer's function moved. The
  function-preserving (F) and zero-product (Z) classes promise 0, up to the rounding of
  ``W'`` to its dtype for F (docs/initializers.md §0);
* ``weight_shift = ‖W' − W‖_F``: 0 for the classes that leave ``W`` alone (Z, S);
* ``delta_norm = ‖s·B·A‖_F`` and ``w_norm = ‖W‖_F``.

``‖s·B·A‖_F`` comes from the r x r Grams (``loram_ref.linalg.gram_norm_sq``), never an
m x n product; a method that leaves ``W`` alone reads ``W`` once for its norm. For one that
rewrites it, each row block of at most :data:`BLOCK_ELEMENTS` elements is read once
before and once after: the difference, its norm, the rank-r update added in place, the
norm again. Block norms are fp32 (``vector_norm``), summed in float64 across blocks. On a
sharded weight each rank sums its block and the four sums are all-reduced (32 bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..linalg import gram_norm_sq

BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Norms:
    w_norm: float
    delta_norm: float
    output_shift: float
    weight_shift: float


def _rows(w: torch.Tensor) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))


def _blocked(before: torch.Tensor, after: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float) -> tuple[float, ...]:
    """``(‖W‖², ‖W' − W‖², ‖W' + s·B·A − W‖²)`` over row blocks: per block one difference,
    its norm, the rank-r update added in place (``addmm_``) and the norm again."""
    w_sq = moved_sq = out_sq = 0.0
    rows = _rows(before)
    af = a.float()
    for i in range(0, before.shape[0], rows):
        w = before[i:i + rows]
        moved = after[i:i + rows].to(torch.float32, copy=True).sub_(w)  # a copy: W' itself is the model's
        w_sq += float(torch.linalg.vector_norm(w, dtype=torch.float32)) ** 2
        moved_sq += float(torch.linalg.vector_norm(moved)) ** 2
        out_sq += float(torch.linalg.vector_norm(moved.addmm_(b[i:i + rows].float(), af, alpha=s))) ** 2
    return w_sq, moved_sq, out_sq


def layer_norms(before: torch.Tensor, after: torch.Tensor | None, b: torch.Tensor, a: torch.Tensor, s: float,
                reduce=None) -> Norms:
    """The layer's :class:`Norms`; ``after=None`` when ``W`` was not touched (then the output
    shift is ``‖s·B·A‖_F``, from the Grams). ``before``/``after``/``b``/``a`` are this rank's
    blocks under sharding and ``reduce`` sums a float64 vector over the ranks."""
    delta_sq = max(0.0, float(gram_norm_sq(b.double(), a.double().mT))) * s * s if b.numel() and a.numel() else 0.0
    if after is None:
        rows = _rows(before)
        w_sq = sum(float(torch.linalg.vector_norm(before[i:i + rows], dtype=torch.float32)) ** 2
                   for i in range(0, before.shape[0], rows))
        sums = torch.tensor([w_sq, delta_sq, delta_sq, 0.0], dtype=torch.float64, device=before.device)
    else:
        w_sq, moved_sq, out_sq = _blocked(before, after, b, a, s)
        sums = torch.tensor([w_sq, delta_sq, out_sq, moved_sq], dtype=torch.float64, device=before.device)
    if reduce is not None:
        sums = reduce(sums)
    w, d, out, moved = (math.sqrt(max(0.0, float(v))) for v in sums)
    return Norms(w_norm=w, delta_norm=d, output_shift=out, weight_shift=moved)
