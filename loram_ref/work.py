"""The work each algorithm must do on an ``m x n`` weight: bytes it must read, bytes it must
read and write back, and floating-point operations. Declared on the registry (``work=``);
the harness turns it into a per-cell hardware floor with measured bandwidths and GEMM
throughput (``bench.initcost.calibrate``), so the report can say how far each initializer is from
the machine, not only how long it took.

Floor model (the loram issue's definition, generalized): ``t_floor = read_bytes / read_bw +
max(rw_bytes / rw_bw, flops / gemm_rate)``: one read pass cannot overlap the write-back it
feeds, while the write-back and the arithmetic can overlap each other. ``gemm_rate`` is
the throughput of the kind of GEMM the algorithm runs: a rank-r update for the one-pass
methods, a large square GEMM for the decompositions (an optimistic floor for an SVD,
which does not run at GEMM speed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Work:
    read_bytes: float = 0.0
    rw_bytes: float = 0.0
    flops: float = 0.0
    #: "lowrank" (a rank-r update, memory bound) or "square" (a large GEMM, compute bound)
    gemm: str = "lowrank"


WorkModel = Callable[[int, int, int, int], Work]


def factors_only(m: int, n: int, r: int, itemsize: int) -> Work:
    """Noise-zeros: W is never read; only the factors are written."""
    return Work(rw_bytes=(m + n) * r * itemsize)


def one_pass_residual(m: int, n: int, r: int, itemsize: int) -> Work:
    """LoRAM: one read for ‖W‖, one read+write for ``W − s·B·A`` (a rank-r GEMM)."""
    return Work(read_bytes=m * n * itemsize, rw_bytes=2 * m * n * itemsize, flops=2.0 * m * n * r)


def svd_flops(m: int, n: int) -> float:
    """An economy SVD of an m x n matrix: ~4·m·n·k + 8·k³ flops (k = min(m, n); Golub & Van Loan)."""
    k = min(m, n)
    return 4.0 * m * n * k + 8.0 * k**3


def full_svd(m: int, n: int, r: int, itemsize: int) -> Work:
    """PiSSA: an economy SVD (:func:`svd_flops`), plus the fp32 work copy and the residual."""
    return Work(read_bytes=m * n * itemsize, rw_bytes=2 * m * n * 4, flops=svd_flops(m, n), gemm="square")


def randomized_svd_work(niter: int) -> WorkModel:
    """A rank-r randomized SVD with ``niter`` subspace iterations: 2·niter + 2 passes of a
    rank-r GEMM over W (fp32), then the residual."""

    def model(m: int, n: int, r: int, itemsize: int) -> Work:
        passes = 2 * niter + 2
        return Work(read_bytes=m * n * itemsize + passes * m * n * 4, rw_bytes=2 * m * n * 4,
                    flops=passes * 2.0 * m * n * r)

    return model


def sign_update_rsvd(m: int, n: int, r: int, itemsize: int) -> Work:
    """LoRA-SB: a rank-r randomized SVD of the fp32 update (niter = 10: 22 GEMM passes), W untouched."""
    return Work(read_bytes=22 * m * n * 4, flops=22 * 2.0 * m * n * r)


def input_space(m: int, n: int, r: int, itemsize: int) -> Work:
    """LoRA-DA: Cholesky (n³/3), its inverse (~n³), the solve for Δ (2·m·n²) and Δ̂ᵀΔ̂ (2·m·n²)."""
    return Work(read_bytes=(m * n + n * n) * 4, rw_bytes=2 * n * n * 4, flops=(4.0 / 3.0) * n**3 + 4.0 * m * n * n,
                gemm="square")
