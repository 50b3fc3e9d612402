"""The CUDA paths, on a GPU (marked ``cuda``; skipped without one): what ``scripts/device_check.py``
runs first on a lent GPU machine (``pytest -m cuda``).

What must hold there: every initializer keeps its invariant on a CUDA weight and returns its
factors on the device; the deterministic ones agree with their CPU results; the streamed
products and the certified solver run on the GPU; a harness cell is measured through the spawn
launcher with CUDA events (``cuda_event_gap`` recorded) and allocator peaks; the calibration
gives every rate; a layer-task run and a loss run on a tiny model train on the GPU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import loram_ref
from loram_ref.linalg import randomized_svd
from loram_ref.stream import RowStream

from .conftest import REL_TOL, rel_err, run_init

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/device_check.py)")]

DEVICE = "cuda"
#: Initializers whose result does not depend on a random draw: the same factors on CPU and CUDA
#: up to the devices' rounding (their decompositions' sums run in another order).
DETERMINISTIC = ("loram_dst", "pissa", "olora", "milora")


@pytest.mark.parametrize("name", sorted(loram_ref.INITIALIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_initializer_keeps_its_invariant_on_the_gpu(name, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    weight = torch.randn(96, 64, device=DEVICE, generator=gen).to(dtype)
    spec = loram_ref.get_initializer(name)
    kwargs = spec.harness_kwargs(generator=torch.Generator(device=DEVICE).manual_seed(1))
    stats_kind = spec.statistics
    if stats_kind.needed:
        kwargs["stats"] = stats_kind.synthetic(96, 64, torch.Generator(device=DEVICE).manual_seed(2), device=DEVICE)
    init = loram_ref.initialize(name, weight.clone(), 4, **kwargs)
    assert init.A.device.type == init.B.device.type == "cuda"
    if spec.invariant == loram_ref.Invariant.FUNCTION_PRESERVING:
        assert init.residual.device.type == "cuda"
        assert rel_err(init.effective_weight(weight), weight) <= REL_TOL[dtype]
    elif spec.invariant == loram_ref.Invariant.ZERO_PRODUCT:  # orthogonal's through orthogonality: up to rounding
        assert float(init.product(torch.float64).norm()) <= REL_TOL[dtype] * float(init.A.double().norm() * init.B.double().norm())


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_initializers_agree_with_their_cpu_results(name):
    weight = torch.randn(128, 96, generator=torch.Generator().manual_seed(3))
    cpu = run_init(name, weight, 4)
    gpu = run_init(name, weight.to(DEVICE), 4)
    # the product s·B·A does not depend on the signs an SVD routine chooses
    assert rel_err(gpu.product().cpu(), cpu.product()) < 1e-4


def test_streamed_products_and_the_randomized_svd_run_on_the_gpu():
    w = torch.randn(3000, 1000, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(4))
    stream = RowStream(w.to(torch.bfloat16), block_elements=1 << 20)
    x = torch.randn(1000, 8, device=DEVICE)
    exact = w.to(torch.bfloat16).double() @ x.double()
    assert stream.workers == 1 and rel_err(stream.times(x), exact) < 1e-5
    u, s, v = randomized_svd(w, 8, 4, torch.Generator(device=DEVICE).manual_seed(5))
    assert u.device.type == "cuda" and s.shape == (8,) and torch.all(s[:-1] >= s[1:])


def test_the_certified_solver_certifies_on_a_spiked_gpu_weight():
    from bench.core.weights import SpikedWeight

    w = SpikedWeight(2048, 2048, top_directions=32).dense(device=DEVICE)
    init = loram_ref.initialize("pissa_krylov", w, 16, generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert init.info["svd"] == "krylov" and init.info["krylov_angle_bound"] <= 1e-4
    full = loram_ref.initialize("pissa", w, 16)
    assert rel_err(init.product(), full.product()) < 1e-4  # full-SVD PiSSA's, whatever each triplet's sign


def test_a_harness_cell_is_measured_with_cuda_events_and_allocator_peaks(tmp_path):
    from bench.initcost.runner import Runner
    from bench.initcost.tasks import Task

    (row,) = Runner(tmp_path / "init.jsonl", progress=False, calibrate=True).run(
        [Task("loram_dst", 4096, 4096, 16, dtype="bfloat16", device=DEVICE, threads=1, values=3)])
    assert row["status"] == "ok", row.get("reason")
    assert row["peak_gpu_allocated_bytes"] > 0 and row["floor_s"] > 0 and row["calib_projection_GFLOPs"] > 0
    assert row["cuda_event_gap"] is not None and math.isfinite(row["cuda_event_gap"])
    assert json.loads(row["init_info"])["basis"] == "dst-I"


def test_the_calibration_gives_every_rate_on_the_gpu():
    from bench.initcost.calibrate import measure

    cal = measure(DEVICE, "bfloat16", 1, elements=1 << 24)
    for value in (cal.read_bytes_per_s, cal.rw_bytes_per_s, cal.lowrank_flops_per_s, cal.square_flops_per_s,
                  cal.projection_flops_per_s):
        assert math.isfinite(value) and value > 0


def test_a_layer_task_run_trains_on_the_gpu():
    from bench.layer.spec import ProblemSpec
    from bench.layer.task import LayerTask
    from bench.layer.worker import run_layer_task

    spec = ProblemSpec(top_directions=8, target_rank=4, target_scale=0.05)
    row = run_layer_task(LayerTask(initializer="loram_dst", d_out=256, d_in=192, seed=0, lr=1e-2, alignment="random",
                                   rank=4, spec=spec.__dict__, steps=5, device=DEVICE, threads=1))
    assert math.isfinite(row["final_loss"]) and row["init_peak_gpu_allocated_bytes"] is not None


def test_a_loss_run_trains_a_tiny_model_on_the_gpu(tmp_path, corpus_file):
    from bench.loss.model import tiny_llama_source
    from bench.loss.run import LossConfig, run_loss

    config = LossConfig(initializers=["noise_zeros", "loram_dst"], steps=4, batch_size=2, seq_len=32, eval_every=2,
                        data=corpus_file, bracket=False, device=DEVICE)
    rows = run_loss(config, tmp_path, progress=False, source=tiny_llama_source())
    summaries = [r for r in rows if r["kind"] == "loss_summary"]
    assert len(summaries) == 2 and all(math.isfinite(r["final_eval_loss"]) for r in summaries)
    assert all(r["device"].startswith("cuda") for r in summaries)
