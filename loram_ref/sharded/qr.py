"""Orthonormalization and sign fixing of a matrix whose rows are spread over the ranks."""

from __future__ import annotations

import torch

from .comm import Collectives


def _cholqr_pass(y: torch.Tensor, comm: Collectives, rows: int, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One CholeskyQR pass: ``G = Σ_k Y_kᵀY_k`` (all-reduced), ``R = chol(G)``, ``Q_k = Y_k R⁻¹``.

    ``shift`` adds ``s·I`` with ``s = 11·(m·q + q(q+1))·u·‖Y‖_F²`` before the factorization
    (shifted CholeskyQR, Fukaya et al. 2020, Eq. 4.1): ``G + sI`` is positive definite for
    any ``Y`` with ``κ(Y) ≲ u^{-1}``; two more plain passes then restore orthogonality.
    """
    gram = comm.all_reduce(y.mT @ y)
    if shift:
        q = y.shape[1]
        unit = torch.finfo(y.dtype).eps / 2
        gram.diagonal().add_(11 * (rows * q + q * (q + 1)) * unit * float(gram.diagonal().sum()))
    r, info = torch.linalg.cholesky_ex(gram, upper=True)
    if int(info) != 0:
        return y, None  # type: ignore[return-value]
    return torch.linalg.solve_triangular(r, y, upper=True, left=False), r


def cholesky_qr(y: torch.Tensor, comm: Collectives, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Y = Q·R`` for a row-sharded ``Y`` (this rank's rows; ``rows`` in all): CholeskyQR2.

    Two passes of :func:`_cholqr_pass` in float64 (Yamamoto et al. 2015: the second pass
    makes ``Q`` orthonormal to working precision for ``κ(Y) ≲ u^{-1/2}`` of the first pass's
    precision, 10⁸ in float64, far beyond what the power iteration hands it); a Gram matrix
    that is not numerically positive definite takes the shifted pass first (CholeskyQR3).
    Each pass is one all-reduce of a ``q x q`` float64 matrix; ``R`` is identical on every
    rank because the all-reduced Gram is. Returns ``Q`` in ``Y``'s dtype (this rank's rows)
    and ``R`` (``q x q``, float64).
    """
    work = y.to(torch.float64)
    q, r = _cholqr_pass(work, comm, rows, shift=False)
    more = 1  # CholeskyQR2: one more plain pass
    if r is None:
        q, r = _cholqr_pass(work, comm, rows, shift=True)
        more = 2  # shifted CholeskyQR3: two more
        if r is None:
            raise ValueError(f"the {rows} x {y.shape[1]} sketch of the weight is numerically rank-deficient (its Gram "
                             "matrix is not positive definite even shifted): the weight's numerical rank is below "
                             "the adapter rank; lower rank, or use the gather baseline (pissa)")
    for _ in range(more):
        q, again = _cholqr_pass(q, comm, rows, shift=False)
        if again is None:
            raise ValueError("CholeskyQR lost orthogonality on a rank-deficient sketch of the weight; lower rank")
        r = again @ r
    return q.to(y.dtype), r


def orthonormal_rows(y: torch.Tensor, comm: Collectives, rows: int) -> torch.Tensor:
    """An orthonormal basis of the columns of a row-sharded ``Y`` (:func:`cholesky_qr`'s ``Q``)."""
    return cholesky_qr(y, comm, rows)[0]


def column_signs(u: torch.Tensor, comm: Collectives | None) -> torch.Tensor:
    """``±1`` per column so that each column's entry of largest magnitude is positive.

    Ties go to the lowest row index (ranks hold increasing row ranges). ``comm`` is the group
    over which ``u``'s rows are spread, or ``None`` when ``u`` is whole on every rank; then
    one all-gather of ``2 x q`` numbers per rank picks each column's global largest entry.
    The same on every rank, and the same as one process would pick on the whole ``u``.
    """
    q = u.shape[1]
    if u.shape[0]:
        idx = u.abs().argmax(dim=0)
        top = u.gather(0, idx[None, :])[0]
    else:  # an empty shard never wins
        top = torch.zeros(q, dtype=u.dtype, device=u.device)
    mags = top.abs() if u.shape[0] else torch.full((q,), -1.0, dtype=u.dtype, device=u.device)
    if comm is not None and comm.world > 1:
        both = comm.all_gather(torch.stack([mags, top]))  # (p, 2, q)
        winner = both[:, 0, :].argmax(dim=0)  # the first (lowest) rank on a tie
        top = both[:, 1, :].gather(0, winner[None, :])[0]
    signs = torch.sign(top)
    signs[signs == 0] = 1
    return signs
