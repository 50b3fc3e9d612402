"""Linear-algebra primitives the initializers and the benchmarks share: randomized SVD,
subspace angles, and the Frobenius norm of a factored product."""

from __future__ import annotations

import torch

from .stream import streamed_products

__all__ = ["gram_norm_sq", "principal_angles", "randomized_svd"]


def _orth(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``x`` (thin QR)."""
    return torch.linalg.qr(x).Q


def randomized_svd(
    a: torch.Tensor, q: int, niter: int, generator: torch.Generator, *, block_elements: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``q`` randomized SVD ``a ≈ U·diag(S)·Vᵀ`` (Halko, Martinsson & Tropp 2011).

    Algorithm 4.4 (randomized subspace iteration) followed by Algorithm 5.1 (direct SVD
    of the projection), i.e. what ``torch.svd_lowrank(a, q, niter)`` computes (docs/initializers.md §2),
    with two differences: the Gaussian test matrix comes from ``generator`` instead of
    the global RNG, and ``a`` is read in row blocks (:class:`loram_ref.stream.RowStream`), so a bf16/fp16
    ``a`` is decomposed in fp32 without an fp32 copy of it. The work is done on ``aᵀ`` when
    ``a`` is wide (m < n), and the test matrix is drawn with the same shape, dtype and
    order as ``torch.svd_lowrank`` draws it on the fp32 matrix, so a generator in the same
    state as the global RNG reproduces PEFT's ``pissa_niter_N`` (to fp32 rounding).

    Cost: ``2·niter + 2`` products with ``a`` (each one read of ``a`` and ``2·m·n·q``
    flops), ``2·niter + 1`` thin QRs of an (m or n) x q matrix and one q x (m or n) SVD.

    Args:
        a: m x n floating matrix, any float dtype (fp32 math for bf16/fp16, fp64 for fp64).
        q: number of components, no oversampling (PEFT uses q = r).
        niter: power (subspace) iterations, each re-orthonormalized.
        generator: source of the Gaussian test matrix.
        block_elements: entries per row block (None: the device's default).

    Returns:
        ``U`` (m x q, orthonormal columns), ``S`` (q, descending), ``V`` (n x q), in the
        compute dtype.
    """
    times_a, times_at, dtype = streamed_products(a, block_elements)
    wide = a.shape[0] < a.shape[1]
    # x = aᵀ when wide: x·v = aᵀ·v and xᵀ·u = a·u
    times_x, times_xt = (times_at, times_a) if wide else (times_a, times_at)
    cols = a.shape[0] if wide else a.shape[1]
    omega = torch.randn(cols, q, dtype=dtype, device=a.device, generator=generator)
    basis = _orth(times_x(omega))  # HMT Alg. 4.4 step 1-2: Q = orth(X Ω)
    for _ in range(niter):  # HMT Alg. 4.4 steps 3-6: Q = orth(X orth(Xᵀ Q))
        basis = _orth(times_xt(basis))
        basis = _orth(times_x(basis))
    u_small, s, vh = torch.linalg.svd(times_xt(basis).mT, full_matrices=False)  # HMT Alg. 5.1: Qᵀ X = Ũ S Vᵀ
    u = basis @ u_small
    v = vh.mT
    return (v, s, u) if wide else (u, s, v)


def principal_angles(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of ``u`` and ``v``.

    Both inputs have orthonormal columns and the same count. Cosines are the singular
    values of ``uᵀv``, sines those of ``v - u·uᵀv`` (Björck & Golub 1973); small angles
    are read from the sines, which stay accurate where ``arccos`` loses half the digits
    (Knyazev & Argentati 2002). Computed in float64.
    """
    u, v = u.double(), v.double()
    proj = u.mT @ v
    from_cos = torch.arccos(torch.linalg.svdvals(proj).clamp(-1.0, 1.0))
    from_sin = torch.arcsin(torch.linalg.svdvals(v - u @ proj).clamp(-1.0, 1.0)).flip(0)
    return torch.where(from_cos < torch.pi / 4, from_sin, from_cos)


def gram_norm_sq(left: torch.Tensor, right: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``‖left·rightᵀ·diag(weights)^½‖_F²`` without forming the m x n product.

    For ``left`` m x c and ``right`` n x c, ``‖left·rightᵀ‖_F² = Σ (leftᵀ·left) ∘ (rightᵀ·right)``
    (the trace of a product of the two c x c Gram matrices): O((m+n)·c²) work and memory.
    ``weights`` (n values) weight the columns of the product. A LoRA update ``s·B·A`` is
    ``gram_norm_sq(B, A.mT) · s²``.
    """
    weighted = right if weights is None else right * weights[:, None]
    return ((left.mT @ left) * (weighted.mT @ right)).sum()
