"""Calibrate the machine once per run, device and dtype: how fast it reads, reads and
writes back, and multiplies, so each cell's time can be set against its hardware floor.

* read bandwidth: one reduction (``sum``) over a buffer far larger than the caches;
* read+write bandwidth: one in-place scaling (``mul_``) of the same buffer;
* rank-r GEMM throughput: ``addmm_`` of a rank-16 update into the buffer (the ``lowrank``
  kind of ``loram_ref.work``);
* fp32 projection throughput: the rank-16 product of a cache-resident fp32 block of 1 Mi
  entries, ``block @ X`` (the ``projection`` kind: the randomized SVD's GEMMs). On CPU it is
  one core's rate times the thread count, a compute roof (each of the SVD's workers runs
  single-threaded kernels on blocks in its own core's cache); on CUDA one product of a
  64 Mi-entry fp32 matrix;
* square GEMM throughput: a 1024 x 1024 x 1024 product (compute bound).

Each figure is the median of 5 timed repetitions after one warm-up, in a fresh process
with the workers' environment and thread count (``python -m bench.initcost.calibrate``), so the
manager never runs kernels itself. A cell's floor is then ``work.floor`` of its
initializer's declared work (``loram_ref.work``), and ``floor_ratio = median / floor``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from loram_ref.work import Work

#: Elements of the calibration buffer: 64 Mi (256 MiB in fp32), far beyond any cache.
BUFFER_ELEMENTS = 1 << 26
REPEATS = 5


@dataclass(frozen=True)
class Calibration:
    device: str
    dtype: str
    threads: int
    read_bytes_per_s: float
    rw_bytes_per_s: float
    lowrank_flops_per_s: float
    square_flops_per_s: float
    projection_flops_per_s: float

    def rate(self, gemm: str) -> float:
        """The calibrated throughput of one kind of GEMM (``loram_ref.work.GEMM_KINDS``)."""
        return {"lowrank": self.lowrank_flops_per_s, "projection": self.projection_flops_per_s,
                "square": self.square_flops_per_s}[gemm]

    def floor_s(self, work: Work) -> float:
        """``read / read_bw + max(rw / rw_bw, flops / gemm_rate)`` (``loram_ref.work``)."""
        return work.read_bytes / self.read_bytes_per_s + max(work.rw_bytes / self.rw_bytes_per_s,
                                                              work.flops / self.rate(work.gemm) if work.flops else 0.0)

    def fields(self) -> dict[str, float]:
        """What every row of this device and dtype records (GB/s and GFLOP/s)."""
        return {"calib_read_GBps": self.read_bytes_per_s / 1e9, "calib_rw_GBps": self.rw_bytes_per_s / 1e9,
                "calib_lowrank_GFLOPs": self.lowrank_flops_per_s / 1e9,
                "calib_square_GFLOPs": self.square_flops_per_s / 1e9,
                "calib_projection_GFLOPs": self.projection_flops_per_s / 1e9}


def _median_time(fn, device) -> float:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    values = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        sync()
        values.append(time.perf_counter() - t0)
    return statistics.median(values)


def measure(device: str, dtype: str, threads: int, elements: int = BUFFER_ELEMENTS) -> Calibration:
    """Calibrate in this process (see the module docstring)."""
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    cols = 8192
    rows = max(1, elements // cols)
    x = torch.randn(rows, cols, device=dev).to(dt)
    item = x.element_size()
    t_read = _median_time(lambda: x.sum(), dev)
    t_rw = _median_time(lambda: x.mul_(1.0), dev)
    b = torch.randn(rows, 16, device=dev).to(dt).mul_(1e-3)
    a = torch.randn(16, cols, device=dev).to(dt).mul_(1e-3)
    t_low = _median_time(lambda: x.addmm_(b, a, alpha=1e-3), dev)
    x = b = a = None  # free the buffer before the square GEMM
    s = torch.randn(1024, 1024, device=dev).to(dt)
    t_sq = _median_time(lambda: s @ s, dev)
    s = None
    return Calibration(device=device, dtype=dtype, threads=threads, read_bytes_per_s=rows * cols * item / t_read,
                       rw_bytes_per_s=2 * rows * cols * item / t_rw, lowrank_flops_per_s=2.0 * rows * cols * 16 / t_low,
                       square_flops_per_s=2.0 * 1024**3 / t_sq,
                       projection_flops_per_s=_projection_rate(dev, threads, cols, elements))


#: Products per timed repetition of the CPU projection measurement (a 1 Mi-entry block is
#: ~0.4 ms of one core's work: 64 of them make a repetition long enough to time).
PROJECTION_PRODUCTS = 64


def _projection_rate(dev, threads: int, cols: int, elements: int) -> float:
    """fp32 flops/s of the rank-16 product ``block @ X`` (the module docstring)."""
    import torch

    from loram_ref.stream import CPU_BLOCK_ELEMENTS

    x = torch.randn(cols, 16, device=dev)
    if dev.type != "cpu":
        big = torch.randn(max(1, elements // cols), cols, device=dev)
        return 2.0 * big.numel() * 16 / _median_time(lambda: big @ x, dev)
    block = torch.randn(max(1, min(CPU_BLOCK_ELEMENTS, elements) // cols), cols)
    out = torch.empty(block.shape[0], 16)

    def products():
        for _ in range(PROJECTION_PRODUCTS):
            torch.mm(block, x, out=out)

    torch.set_num_threads(1)
    try:
        per_core = 2.0 * block.numel() * 16 * PROJECTION_PRODUCTS / _median_time(products, dev)
    finally:
        torch.set_num_threads(threads)
    return per_core * threads


def calibrate(device: str, dtype: str, threads: int, timeout_s: float = 300.0) -> Calibration:
    """:func:`measure` in a fresh process with the workers' environment (it dies with this one)."""
    from bench.core.children import child_env
    from bench.core.launchers import WORKER_ENV, die_with_parent

    proc = subprocess.run([sys.executable, "-m", "bench.initcost.calibrate", "--device", device, "--dtype", dtype,
                           "--threads", str(threads)], capture_output=True, text=True, timeout=timeout_s,
                          env=child_env(WORKER_ENV), preexec_fn=die_with_parent)
    if proc.returncode != 0:
        raise RuntimeError(f"calibration failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return Calibration(**json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.initcost.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(asdict(measure(args.device, args.dtype, args.threads))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
