"""PiSSA on a sharded weight: a distributed randomized SVD, and the gather baseline (docs/initializers.md §2)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from ..linalg import _orth
from ..pissa import _pissa_factors
from ..residual import work_copy
from ..registry import get_initializer
from ..validation import check_inputs, check_positive_int, is_finite, resolve_generator
from .comm import Collectives
from .layout import Layout, layout_of, replicated, shape_proxy, sharded
from .qr import cholesky_qr, column_signs, orthonormal_rows
from .registry import ShardedLoraInit, register_sharded


def sharded_randomized_svd(local: torch.Tensor, lay: Layout, q: int, niter: int, generator: torch.Generator,
                           comm: Collectives) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``q`` randomized SVD of the sharded ``W`` (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

    The same algorithm as :func:`loram_ref.linalg.randomized_svd`, with the same test matrix:
    it works on ``x = Wᵀ`` when ``W`` is wide, draws ``Ω`` (``x.shape[1] x q``) whole from
    ``generator`` on every rank, and runs ``Q = orth(xΩ)``, ``niter`` times
    ``Q = orth(x·orth(xᵀQ))``, then the SVD of ``Qᵀx``. Only the products cross ranks:

    * ``x``'s rows sharded: ``x·V`` is local (row-sharded), ``xᵀ·U`` and ``Qᵀx`` are all-reduced
      (``n_x x q`` floats); a row-sharded basis is orthonormalized by CholeskyQR2 on an
      all-reduced ``q x q`` Gram matrix (:func:`cholesky_qr`), a replicated one by the same
      Householder QR as one process;
    * ``x``'s columns sharded: this rank's rows of ``Ω``; ``x·V`` is all-reduced (``m_x x q``),
      ``xᵀ·U`` is local; the SVD of the column-sharded ``Qᵀx`` goes through the CholeskyQR
      of its transpose, ``(Qᵀx)ᵀ = Q₂R``, and the SVD of the ``q x q`` ``R``.

    Householder and Cholesky QR give the same basis up to column signs, which the SVD of the
    projection absorbs: the triplets are the single-process ones up to sign and rounding.

    Returns ``U`` (``m x q``: this rank's rows under ``Shard(0)``, whole otherwise), ``S``
    (``q``, descending) and ``V`` (``n x q``: this rank's rows under ``Shard(1)``).
    """
    m, n = lay.shape
    wide = m < n
    x = local.mT if wide else local
    mx, nx = (n, m) if wide else (m, n)
    rows_sharded = (lay.dim == 0) != wide  # whether x's rows are the sharded dimension
    omega = torch.randn(nx, q, dtype=x.dtype, device=x.device, generator=generator)  # as randomized_svd draws it
    if rows_sharded:
        basis = orthonormal_rows(x @ omega, comm, mx)  # HMT Alg. 4.4 steps 1-2
        for _ in range(niter):  # steps 3-6
            basis = orthonormal_rows(x @ _orth(comm.all_reduce(x.mT @ basis)), comm, mx)
        u_small, s, vh = torch.linalg.svd(comm.all_reduce(basis.mT @ x), full_matrices=False)  # Alg. 5.1
        u, v = basis @ u_small, vh.mT
    else:
        omega = omega[lay.start:lay.stop]
        basis = _orth(comm.all_reduce(x @ omega))
        for _ in range(niter):
            basis = _orth(comm.all_reduce(x @ orthonormal_rows(x.mT @ basis, comm, nx)))
        q2, r = cholesky_qr(x.mT @ basis, comm, nx)  # (Qᵀx)ᵀ = Q₂R, Q₂ row-sharded
        ur, s, vrh = torch.linalg.svd(r.to(x.dtype))  # Qᵀx = (Vrᵀ)·S·(Q₂·Ur)ᵀ
        u, v = basis @ vrh.mT, q2 @ ur
    return (v, s, u) if wide else (u, s, v)


def _check_finite(local: torch.Tensor, comm: Collectives) -> None:
    """NaN/Inf anywhere refuses the weight on every rank at once (one all-reduced flag)."""
    if not comm.all_true(bool(local.numel() == 0 or is_finite(local)), local.device):
        raise ValueError("weight contains NaN or Inf values (on at least one rank's shard)")


def _wrap(init, weight: DTensor, lay: Layout, rank: int) -> ShardedLoraInit:
    """Local factors and residual (``B`` rows / ``A`` columns per the layout) as DTensors."""
    m, n = lay.shape
    return ShardedLoraInit(
        method=init.method,
        A=sharded(init.A, weight, 1, (rank, n)) if lay.dim == 1 else replicated(init.A, weight),
        B=sharded(init.B, weight, 0, (m, rank)) if lay.dim == 0 else replicated(init.B, weight),
        scaling=init.scaling,
        residual=sharded(init.residual, weight, lay.dim, (m, n)),
        info=init.info,
    )


# Against the single-process rSVD the triplets differ by rounding amplified by the gaps of
# the spectrum (a column of B moves by ~u·σ₁/(σ_j − σ_{j±1})): the tests' weights keep
# their top r+1 singular values apart by >= 10 %, where fp32 agrees to ~1e-5 and fp64 to
# ~1e-13. On a flat spectrum (Gaussian W) the factors are ill-determined in any precision.
_SVD_TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2}


@register_sharded(
    "pissa_rsvd",
    communication="2·niter+2 all-reduces of n_x x q or m_x x q floats, 2 per orthonormalization of q x q float64, "
                  "one sign all-gather",
    tolerance=_SVD_TOLERANCE,
    sign_free=True,
    summary="distributed randomized SVD: local W·Ω, CholeskyQR2 on all-reduced Grams, Wᵀ·Q all-reduced, small SVD "
            "replicated, signs fixed by the largest entry of each column of B",
)
def pissa_rsvd(weight: DTensor, rank: int, scaling: float = 1.0, *, niter: int = 4,
               generator: torch.Generator | None = None, seed: int = 0, inplace: bool = False, check_input: bool = True,
               comm: Collectives | None = None) -> ShardedLoraInit:
    """:func:`loram_ref.pissa.pissa_rsvd` on a sharded weight, nothing gathered (docs/initializers.md §2).

    The triplets come from :func:`sharded_randomized_svd` (``q = r``, no oversampling, as
    PEFT); each triplet's sign is fixed so that the largest entry of ``U_j`` is positive
    (:func:`column_signs`), so every rank holds the same factors whatever the world size.
    Then docs/initializers.md §2 steps 3-5 on this rank's block, in fp32: ``A = diag(√(σ/s))·Vᵀ``,
    ``B = U·diag(√(σ/s))``, ``W_res = W − s·B·A``. Per rank: ``2·niter + 2`` passes over its
    shard (the sketch's GEMMs), one fp32 copy of the shard (the residual), ``O((m + n)·r)``
    more.
    """
    lay = layout_of(weight)
    scaling = check_inputs(shape_proxy(weight), rank, scaling, check_input=False)
    niter = check_positive_int(niter, "niter", minimum=0)
    comm = comm or Collectives(weight.device_mesh.get_group())
    local = weight.to_local()
    if check_input:
        _check_finite(local, comm)
    gen = resolve_generator(generator, local.device, seed)
    work = work_copy(local, inplace)
    u, s, v = sharded_randomized_svd(work, lay, rank, niter, gen, comm)
    signs = column_signs(u, comm if lay.dim == 0 else None)
    u.mul_(signs)
    v.mul_(signs)
    info = {"svd": "randomized, distributed", "niter": niter, "oversampling": 0, "world_size": lay.world}
    init = _pissa_factors("pissa_rsvd", local, work, u, s, v.mT.contiguous(), scaling, inplace, info)
    return _wrap(init, weight, lay, rank)


def gather_weight(local: torch.Tensor, lay: Layout, comm: Collectives) -> torch.Tensor:
    """The whole ``m x n`` weight on every rank (DeepSpeed ZeRO-3's ``GatheredParameters``).

    One all-gather of equal blocks (the last shards padded to the chunk size), straight into
    the full-size buffer; under ``Shard(1)`` the blocks are gathered transposed and the
    result is a transposed view (no extra copy).
    """
    m, n = lay.shape
    block = local if lay.dim == 0 else local.mT
    if block.shape[0] < lay.chunk:
        block = torch.cat([block, block.new_zeros(lay.chunk - block.shape[0], block.shape[1])])
    stacked = comm.all_gather(block.contiguous())  # (p, chunk, other)
    whole = stacked.reshape(lay.world * lay.chunk, -1)[: lay.size]
    return whole if lay.dim == 0 else whole.mT


def gathered_init(name: str, weight: DTensor, rank: int, scaling: float, comm: Collectives | None,
                  inplace: bool = False, **kwargs) -> ShardedLoraInit:
    """The gather baseline of any single-process initializer ``name``: every rank gathers ``W``
    (:func:`gather_weight`), runs it on the whole weight (the same computation p times over)
    and keeps its block of the factors and the residual."""
    lay = layout_of(weight)
    comm = comm or Collectives(weight.device_mesh.get_group())
    local = weight.to_local()
    whole = gather_weight(local, lay, comm)
    spec = get_initializer(name)
    if "inplace" in spec.harness:
        kwargs[spec.harness["inplace"]] = True  # the gathered copy is this call's own
    init = spec.fn(whole, rank, scaling, **kwargs)
    if init.residual is not None:
        residual = lay.block(init.residual)
        residual = local.copy_(residual) if inplace else residual.clone(memory_format=torch.contiguous_format)
        init.residual = residual
    if lay.dim == 0:
        init.B = lay.block(init.B, dim=0).clone()
    else:
        init.A = lay.block(init.A, dim=1).contiguous()
    init.info = {**init.info, "gathered": True, "world_size": lay.world}
    del whole
    if init.residual is None:
        return ShardedLoraInit(method=init.method,
                               A=sharded(init.A, weight, 1, (rank, lay.shape[1])) if lay.dim == 1 else replicated(init.A, weight),
                               B=sharded(init.B, weight, 0, (lay.shape[0], rank)) if lay.dim == 0 else replicated(init.B, weight),
                               scaling=init.scaling, residual=None, info=init.info)
    return _wrap(init, weight, lay, rank)


@register_sharded(
    "pissa",
    communication="one all-gather of the whole weight to every rank",
    tolerance=_SVD_TOLERANCE,
    sign_free=True,
    gathers_weight=True,
    summary="the baseline PEFT runs under ZeRO-3: gather W on every rank, full SVD there, keep this rank's part",
)
def pissa(weight: DTensor, rank: int, scaling: float = 1.0, *, inplace: bool = False, check_input: bool = True,
          comm: Collectives | None = None) -> ShardedLoraInit:
    """Full-SVD PiSSA as PEFT runs it on a ZeRO-3 sharded weight: every rank gathers ``W``,
    runs :func:`loram_ref.pissa.pissa` on it (the same SVD, p times over) and keeps its part.

    Per rank: the whole weight (gathered), its fp32 decomposition workspace and the full
    ``U``, ``Vᵀ``; ``(p − 1)·|shard|`` bytes sent. The baseline the sharded methods are
    measured against.
    """
    return gathered_init("pissa", weight, rank, scaling, comm, inplace=inplace, check_input=check_input)


_GATHER = "one all-gather of the whole weight to every rank"


@register_sharded("milora", communication=_GATHER, tolerance=_SVD_TOLERANCE, sign_free=True, gathers_weight=True,
                  summary="the gather baseline: W gathered on every rank, its full SVD's minor triplets there")
def milora(weight: DTensor, rank: int, scaling: float = 1.0, *, inplace: bool = False, check_input: bool = True,
           comm: Collectives | None = None) -> ShardedLoraInit:
    """:func:`loram_ref.minor.milora` on the gathered weight (the minor triplets need the full SVD)."""
    return gathered_init("milora", weight, rank, scaling, comm, inplace=inplace, check_input=check_input)


@register_sharded("mica", communication=_GATHER, tolerance=_SVD_TOLERANCE, sign_free=True, gathers_weight=True,
                  summary="the gather baseline: W gathered on every rank, its full SVD's minor left vectors there")
def mica(weight: DTensor, rank: int, scaling: float = 1.0, *, check_input: bool = True,
         comm: Collectives | None = None) -> ShardedLoraInit:
    """:func:`loram_ref.minor.mica` on the gathered weight."""
    return gathered_init("mica", weight, rank, scaling, comm, check_input=check_input)


@register_sharded("loftq", communication=_GATHER, tolerance={torch.float32: 2e-4, torch.float64: 1e-9,
                                                             torch.bfloat16: 2e-2},
                  sign_free=True, gathers_weight=True,
                  summary="the gather baseline: W gathered on every rank, quantized and decomposed there")
def loftq(weight: DTensor, rank: int, scaling: float = 1.0, *, bits: int = 4, iterations: int = 1,
          check_input: bool = True, comm: Collectives | None = None) -> ShardedLoraInit:
    """:func:`loram_ref.loftq.loftq` on the gathered weight (NF4 blocks run along the flattened
    whole weight, so a shard alone cannot be quantized as one process would)."""
    return gathered_init("loftq", weight, rank, scaling, comm, bits=bits, iterations=iterations,
                         check_input=check_input)
