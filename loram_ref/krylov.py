"""W's top-r singular triplets with a certificate, from a restarted block Krylov method
(docs/initializers.md §2 "Exact PiSSA without the full SVD").

A full SVD computes all min(m, n) triplets to use r of them. On a spectrum that decays past
σ_r, a block Krylov method finds the top r in a few dozen products with W, and its residuals
say how close they are: for Ritz triplets ``(u_i, σ̃_i, v_i)`` with ``W·v_i = σ̃_i·u_i``
(exact here, by construction) and residuals ``R = Wᵀ·U_r − V_r·Σ̃_r``, Wedin's sin Θ theorem
(Wedin 1972) bounds the largest principal angle between the returned and the exact top-r
singular subspaces by

    sin Θ ≤ ‖R‖₂ / δ,   δ = σ̃_r − (σ̃_{r+1} + ρ_{r+1}),

where ``σ̃_{r+1} + ρ_{r+1}`` (the next Ritz value and its residual) bounds the singular value
it approximates from above. The bound is a certificate as far as that Ritz value stands for
σ_{r+1}: a Krylov method cannot see a direction its start block is orthogonal to, which a
Gaussian start with 2r columns misses with probability zero in exact arithmetic (and with
vanishing probability in floating point; Halko, Martinsson & Tropp 2011 §10).

The method (Golub & Van Loan, *Matrix Computations* §10.3-10.4; the thick restart of Wu &
Simon 2000): a start block V₀ (n x b, b = 2r, Gaussian from the caller's generator); per
cycle the Krylov basis K = [V₀, (WᵀW)V₀, …, (WᵀW)^d V₀] with two passes of block Gram-Schmidt
against all earlier blocks, the Rayleigh-Ritz triplets from the SVD of W·K (whose products
were made while building K), the residual pass Wᵀ·U_b, and a restart from the top b Ritz
vectors, whose W-product and first WᵀW-product are the Ritz values times U_b and the residual
pass itself: a cycle costs 2·d products with W or Wᵀ. The first cycle runs in W's own compute
dtype (fp32 products cost a third of fp64's here) and brings the subspace to ~1e-2; the
following cycles run in float64 (W's values are exact in it), restarted from the first
cycle's Ritz vectors, and only their residuals certify: in fp32 the residuals stall at
~eps₃₂·‖W‖, which bounds the angle at ‖R‖/δ ≈ 4e-4 on the layer task's spiked 4096 x 4096 W,
where fp64 certifies 1e-7.

It stops when the bound is at most ``tol``, or gives up (``certified=False``, with the reason)
when its budget of products is spent or a cycle no longer halves the bound; the caller then
takes a full SVD (``loram_ref.pissa``). The default budget is a quarter of a full SVD's flops
(fp64 products counted twice), so a fall-back costs at most 1.25x the full SVD.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .stream import streamed_products
from .work import svd_flops

#: Krylov steps per restart cycle: basis of 2r·(DEPTH + 1) columns.
DEPTH = 10
#: Krylov steps of the float64 cycles, which start from the first cycle's Ritz vectors.
PRECISE_DEPTH = 4
#: The largest share of min(m, n) the Krylov basis may span. Beyond it the Rayleigh-Ritz SVD
#: of W·K costs about what a full SVD does: on SmolLM2's 576-wide layers a full SVD takes
#: 6-80 ms, and one cycle with a 416-column basis (r = 16) as long, so the solver declines
#: (``shape``: at r = 16, min(m, n) < 1408) and the caller goes straight to the full SVD.
MAX_BASIS_FRACTION = 0.25
#: The fraction of a full SVD's flops the default budget allows (fp64 products count twice).
BUDGET_FRACTION = 0.25
#: The default certified bound on the largest principal angle (radians).
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Certificate:
    """What :func:`certified_top_triplets` can say about its answer.

    Attributes:
        certified: the angle bound is at most the tolerance.
        angle_bound: Wedin's bound on the largest principal angle between the returned and
            the exact top-r singular subspaces, in radians (``inf``: no gap could be shown).
        residual: ``max_i ‖Wᵀ·u_i − σ̃_i·v_i‖ / σ̃_1`` over the kept triplets.
        gap: ``δ / σ̃_1`` (non-positive: σ_r and σ_{r+1} are not told apart).
        passes: products with W or Wᵀ (each with at most 2r columns).
        budget: the products allowed.
        cycles: restart cycles run.
        reason: ``certified``, ``budget`` (spent), ``stagnated`` (a cycle no longer halves
            the bound) or ``shape`` (the basis would span more than :data:`MAX_BASIS_FRACTION`
            of min(m, n): nothing is computed).
    """

    certified: bool
    angle_bound: float
    residual: float
    gap: float
    passes: int
    budget: int
    cycles: int
    reason: str

    def info(self) -> dict:
        """Flat fields for ``LoraInit.info`` (prefixed ``krylov_``); a bound or residual that
        could not be shown (``inf``) is None, so results files stay strict JSON."""
        return {f"krylov_{k}": (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def least_passes() -> int:
    """Products of the shortest run that can certify: the first cycle (the start block's two
    products, ``2·DEPTH − 1`` in the basis, the residual pass), the switch to float64 (two)
    and one float64 cycle (``2·PRECISE_DEPTH``)."""
    return 2 * DEPTH + 2 + 2 + 2 * PRECISE_DEPTH


def default_budget(m: int, n: int, block: int) -> int:
    """Products allowed: :data:`BUDGET_FRACTION` of a full SVD's flops (``work.svd_flops``),
    each fp64 product of ``2·m·n·block`` flops counted twice, and at least :func:`least_passes`."""
    per_product = 2.0 * m * n * block * 2.0
    return max(least_passes(), int(BUDGET_FRACTION * svd_flops(m, n) / per_product))


def _orthonormal_against(z: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """``z``'s columns made orthonormal to every block in ``blocks`` and to each other: two
    passes of block classical Gram-Schmidt (the second restores what rounding lost), then QR."""
    for _ in range(2):
        for q in blocks:
            z = z - q @ (q.mT @ z)
    return torch.linalg.qr(z).Q


def certified_top_triplets(
    a: torch.Tensor,
    rank: int,
    generator: torch.Generator,
    *,
    tol: float = TOLERANCE,
    max_passes: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Certificate]:
    """The top ``rank`` singular triplets of ``a`` and their :class:`Certificate` (module docstring).

    ``a`` is read through :func:`loram_ref.stream.streamed_products` (row blocks up-cast to
    ``dtype``; a bf16 W is never copied whole). Returns ``U`` (m x r), ``S`` (r, descending),
    ``V`` (n x r) in ``dtype`` and the certificate; when it is not certified the triplets
    are the best found, for the caller to replace.
    """
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite angle > 0 (radians), got {tol!r}")
    m, n = a.shape
    wide = m < n  # the basis lives on the smaller side
    cols = m if wide else n  # x = aᵀ when wide
    block = 2 * rank
    depth = DEPTH
    budget = default_budget(m, n, block) if max_passes is None else int(max_passes)
    if budget < 1:
        raise ValueError(f"max_passes must be >= 1, got {max_passes!r}")
    if block * (depth + 1) > MAX_BASIS_FRACTION * min(m, n):
        empty = Certificate(False, math.inf, math.inf, 0.0, 0, budget, 0, "shape")
        zeros = dict(dtype=dtype, device=a.device)  # nothing computed: zeros, for the caller to replace
        return torch.zeros(m, rank, **zeros), torch.zeros(rank, **zeros), torch.zeros(n, rank, **zeros), empty

    def products(precision: torch.dtype | None):
        times_a, times_at, used = streamed_products(a, dtype=precision)
        return ((times_at, times_a) if wide else (times_a, times_at)), used

    (times_x, times_xt), working = products(None)  # the first cycle in W's own compute dtype (fp32)
    start = torch.randn(cols, block, dtype=working, device=a.device, generator=generator)
    v0 = torch.linalg.qr(start).Q
    xv0 = times_x(v0)
    z = times_xt(xv0)  # (XᵀX)·V₀
    passes, cycles, best = 2, 0, math.inf
    while True:
        cycles += 1
        basis, made = [v0], [xv0]
        for step in range(depth):
            q = _orthonormal_against(z, basis)
            basis.append(q)
            made.append(times_x(q))
            passes += 1
            if step < depth - 1:
                z = times_xt(made[-1])
                passes += 1
        u, s, zh = torch.linalg.svd(torch.cat(made, 1), full_matrices=False)  # Rayleigh-Ritz: X·K = Ũ Σ̃ Z̃ᵀ
        v_b = torch.cat(basis, 1) @ zh[:block].mT  # the top b Ritz vectors (X·v_i = σ̃_i·u_i)
        u_b, s_b = u[:, :block], s[:block]
        xt_u = times_xt(u_b)  # the residual pass, and the next cycle's first Krylov product
        passes += 1
        residual = xt_u - v_b * s_b  # Xᵀ·u_i − σ̃_i·v_i
        rho = residual.norm(dim=0)
        sigma1 = float(s_b[0]) if float(s_b[0]) > 0 else 1.0
        delta = float(s_b[rank - 1] - (s_b[rank] + rho[rank]))
        bound = float(torch.linalg.matrix_norm(residual[:, :rank], ord=2)) / delta if delta > 0 else math.inf
        final = working == dtype  # only residuals computed in ``dtype`` certify
        next_cycle = 2 * depth if final else 2 + 2 * min(depth, PRECISE_DEPTH)  # a switch remakes two products
        reason = ("certified" if final and bound <= tol else "budget" if passes + next_cycle > budget
                  else "stagnated" if final and cycles > 1 and not bound < 0.5 * best else "")
        if reason:
            certificate = Certificate(reason == "certified", bound, float(rho[:rank].max()) / sigma1, delta / sigma1,
                                      passes, budget, cycles, reason)
            u_r, s_r, v_r = u_b[:, :rank], s_b[:rank], v_b[:, :rank]
            return (v_r, s_r, u_r, certificate) if wide else (u_r, s_r, v_r, certificate)
        if final:
            best = min(best, bound)
            v0, xv0, z = v_b, u_b * s_b, xt_u * s_b  # thick restart: X·V_b = U_b Σ̃_b, XᵀX·V_b = (Xᵀ U_b) Σ̃_b
        else:  # from here on in ``dtype``: restart from the Ritz vectors, their products made again in it
            (times_x, times_xt), working = products(dtype)
            depth = min(depth, PRECISE_DEPTH)
            v0 = torch.linalg.qr(v_b.to(dtype)).Q
            xv0 = times_x(v0)
            z = times_xt(xv0)
            passes += 2
