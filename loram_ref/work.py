"""The work each algorithm must do on an ``m x n`` weight: bytes it must read, bytes it must
read and write back, and floating-point operations. Declared on the registry (``work=``);
the harness turns it into a per-cell hardware floor with measured bandwidths and GEMM
throughput (``bench.initcost.calibrate``), so the report can say how far each initializer is from
the machine, not only how long it took.

Floor model: ``t_floor = read_bytes / read_bw + max(rw_bytes / rw_bw, flops / gemm_rate)``:
one read pass cannot overlap the write-back it feeds, while the write-back and the
arithmetic can overlap each other. ``gemm_rate`` is the throughput of the kind of GEMM the
algorithm runs (:data:`GEMM_KINDS`): a rank-r update in the weight's dtype for the one-pass
methods, rank-q fp32 products for the randomized SVDs, a large square GEMM for the full
decompositions (an optimistic floor for an SVD, which does not run at GEMM speed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


#: The kinds of GEMM a floor's arithmetic is charged at, each calibrated on its own
#: (``bench.initcost.calibrate``):
#:
#: * ``lowrank``: a rank-r update ``W += B·A`` in the weight's dtype, in place over W in memory
#:   (LoRAM's residual);
#: * ``projection``: rank-q products ``W·X`` and ``Wᵀ·Y`` in fp32 on row blocks of W staged in
#:   cache (the randomized SVD, :class:`loram_ref.stream.RowStream`). The arithmetic is fp32
#:   whatever W's dtype, as PEFT's is, and fp32 runs at half the bf16 rate on a CPU with
#:   bf16 dot products (a smaller fraction on a GPU's tensor cores): charging it at the bf16
#:   update's rate would set a floor no fp32 computation can reach;
#: * ``square``: a large square GEMM in the weight's dtype, compute bound (the decompositions).
GEMM_KINDS = ("lowrank", "projection", "square")


@dataclass(frozen=True)
class Work:
    read_bytes: float = 0.0
    rw_bytes: float = 0.0
    flops: float = 0.0
    #: which calibrated rate the flops run at (:data:`GEMM_KINDS`)
    gemm: str = "lowrank"

    def __post_init__(self) -> None:
        if self.gemm not in GEMM_KINDS:
            raise ValueError(f"gemm must be one of {', '.join(GEMM_KINDS)}, got {self.gemm!r}")
        for name in ("read_bytes", "rw_bytes", "flops"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value != float("inf")):
                raise ValueError(f"Work.{name} must be a finite number >= 0, got {value!r}")


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
    """PiSSA on a rank-r randomized SVD with ``niter`` subspace iterations: ``2·niter + 2``
    reads of W in its own dtype (each a rank-r fp32 product; W is streamed in row blocks,
    never copied whole), then the residual: one read and write of W and one more rank-r
    GEMM."""

    def model(m: int, n: int, r: int, itemsize: int) -> Work:
        passes = 2 * niter + 2
        return Work(read_bytes=passes * m * n * itemsize, rw_bytes=2 * m * n * itemsize,
                    flops=(passes + 1) * 2.0 * m * n * r, gemm="projection")

    return model


def sign_update_rsvd(m: int, n: int, r: int, itemsize: int) -> Work:
    """LoRA-SB: a rank-r randomized SVD of the fp32 update (niter = 10: 22 passes, each a
    rank-r fp32 product), one more read for ‖ΔW‖ (the captured energy), W untouched."""
    return Work(read_bytes=23 * m * n * 4, flops=22 * 2.0 * m * n * r, gemm="projection")


def input_space(m: int, n: int, r: int, itemsize: int) -> Work:
    """LoRA-DA: Cholesky (n³/3), its inverse (~n³), the solve for Δ (2·m·n²) and Δ̂ᵀΔ̂ (2·m·n²)."""
    return Work(read_bytes=(m * n + n * n) * 4, rw_bytes=2 * n * n * 4, flops=(4.0 / 3.0) * n**3 + 4.0 * m * n * n,
                gemm="square")
