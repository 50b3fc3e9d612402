"""Hardware floors: the calibration, the floor model, and the rows that carry them."""

from __future__ import annotations

import math

import pytest

import loram_ref
from bench.initcost.calibrate import Calibration, measure
from bench.initcost.runner import Runner
from bench.initcost.tasks import Task
from loram_ref.work import Work

CAL = Calibration("cpu", "float32", 2, read_bytes_per_s=10e9, rw_bytes_per_s=20e9, lowrank_flops_per_s=50e9,
                  square_flops_per_s=200e9, projection_flops_per_s=100e9)


def test_the_floor_is_a_read_then_the_larger_of_write_back_and_arithmetic():
    assert CAL.floor_s(Work(read_bytes=1e9, rw_bytes=2e9, flops=1e9)) == pytest.approx(0.1 + 0.1)  # write-back bound
    assert CAL.floor_s(Work(read_bytes=1e9, rw_bytes=2e9, flops=1e10)) == pytest.approx(0.1 + 0.2)  # GEMM bound
    assert CAL.floor_s(Work(flops=1e10, gemm="square")) == pytest.approx(0.05)
    assert CAL.floor_s(Work(read_bytes=1e9, flops=1e10, gemm="projection")) == pytest.approx(0.1 + 0.1)
    assert CAL.fields() == {"calib_read_GBps": 10.0, "calib_rw_GBps": 20.0, "calib_lowrank_GFLOPs": 50.0,
                            "calib_square_GFLOPs": 200.0, "calib_projection_GFLOPs": 100.0}


def test_work_refuses_an_unknown_gemm_kind_and_negative_amounts():
    with pytest.raises(ValueError, match="gemm must be one of lowrank, projection, square"):
        Work(flops=1.0, gemm="tensor-core")
    with pytest.raises(ValueError, match="Work.read_bytes must be a finite number >= 0"):
        Work(read_bytes=-1.0)


def test_the_randomized_svds_are_charged_their_reads_in_the_weights_dtype_at_the_fp32_projection_rate():
    m, n, r = 28672, 8192, 16
    pissa = loram_ref.get_initializer("pissa_rsvd").work(m, n, r, 2)  # bf16: no fp32 copy of W is read
    assert pissa.gemm == "projection" and pissa.read_bytes == 10 * m * n * 2 and pissa.rw_bytes == 2 * m * n * 2
    assert pissa.flops == 11 * 2.0 * m * n * r  # 10 products and the residual's GEMM
    sb = loram_ref.get_initializer("lora_sb").work(m, n, r, 2)  # the fp32 update, whatever W's dtype
    assert sb.gemm == "projection" and sb.read_bytes == 23 * m * n * 4 and sb.flops == 22 * 2.0 * m * n * r


def test_every_initializer_declares_its_work():
    for name, spec in loram_ref.INITIALIZERS.items():
        work = spec.work(4096, 1024, 16, 2)
        assert work.read_bytes >= 0 and work.rw_bytes >= 0 and work.flops >= 0 and CAL.floor_s(work) > 0, name
    # LoRAM's floor is the loram issue's: one read + max(one read-write, the rank-r GEMM)
    w = loram_ref.get_initializer("loram_dst").work(28672, 8192, 16, 2)
    assert w.read_bytes == 28672 * 8192 * 2 and w.rw_bytes == 2 * w.read_bytes and w.flops == 2 * 28672 * 8192 * 16


def test_measure_gives_finite_positive_rates():
    cal = measure("cpu", "float32", 1, elements=1 << 20)
    for value in (cal.read_bytes_per_s, cal.rw_bytes_per_s, cal.lowrank_flops_per_s, cal.square_flops_per_s,
                  cal.projection_flops_per_s):
        assert math.isfinite(value) and value > 0


def test_a_calibrated_run_gives_each_row_its_floor(tmp_path):
    (row,) = Runner(tmp_path / "i.jsonl", progress=False, calibrate=True).run(
        [Task("loram_dst", 512, 256, 8, values=2, threads=1)])
    assert row["status"] == "ok" and row["floor_s"] > 0 and row["calib_read_GBps"] > 0
    assert row["floor_ratio"] == pytest.approx(row["median_s"] / row["floor_s"])
