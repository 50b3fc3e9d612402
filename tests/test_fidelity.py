"""Fidelity to the official code and to the exact decompositions."""

from __future__ import annotations

import pytest
import torch

import loram_ref
from loram_ref import LoraSBStats


def _official_lora_sb_product(update: torch.Tensor, rank: int) -> torch.Tensor:
    """The official draw order, rebuilt from its published description (CERT-Lab/lora-sb,
    ``get_svd_grad``): seed the global RNG with 42, draw one unused d_out x r Gaussian,
    then ``torch.svd_lowrank(ΔWᵀ, q=r, niter=10)``; factors rounded to bf16."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)
        torch.randn(update.shape[0], rank)
        p, s, q = torch.svd_lowrank(update.mT.float(), q=rank, niter=10)
    p, s, q = p.bfloat16().float(), s.bfloat16().float(), q.bfloat16().float()
    return q @ torch.diag(s) @ p.mT


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


@pytest.mark.parametrize("m,n,r", [(512, 1024, 8), (1024, 512, 16), (300, 200, 4)])
def test_lora_sb_reproduces_the_official_factors_on_flat_sign_spectra(m, n, r):
    gen = torch.Generator().manual_seed(m + n + r)
    stats = LoraSBStats.from_gradient_sum(torch.randn(m, n, generator=gen), 3e-7)  # a sign update: flat spectrum
    official = _official_lora_sb_product(stats.update, r)
    ours = loram_ref.initialize("lora_sb", torch.zeros(m, n), r, stats=stats)
    assert _rel(ours.product(), official) <= 1e-3
    skipped = loram_ref.initialize("lora_sb", torch.zeros(m, n), r, stats=stats, official_draw=False)
    assert _rel(skipped.product(), official) > 0.1  # without the draw: another subspace (why the draw matters)
    assert 0 < ours.info["captured_energy"] < 1


def _decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A weight with a decaying spectrum σ_i = 0.9^i (orthonormal singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g)).Q
    s = 0.9 ** torch.arange(min(m, n), dtype=torch.float32)
    return (u * s) @ v.mT


def test_pissa_rsvd_fidelity_shrinks_with_niter_on_a_decaying_spectrum():
    w = _decaying(300, 200)
    init = loram_ref.initialize("pissa_rsvd", w, 8)
    fid = loram_ref.get_initializer("pissa_rsvd").fidelity(w, 8, init, {})
    angles = [fid[f"angle_deg_niter{k}"] for k in (0, 2, 4, 16)]
    assert angles == sorted(angles, reverse=True) and angles[-1] < 1.0 and angles[0] > angles[-1]
    assert fid["angle_deg"] == pytest.approx(fid["angle_deg_niter4"], abs=1e-3)  # the default niter is 4


def test_lora_sb_energy_is_at_most_the_eckart_young_optimum():
    w = torch.zeros(300, 200)
    stats = LoraSBStats(update=_decaying(300, 200, seed=1))
    init = loram_ref.initialize("lora_sb", w, 8, stats=stats, round_bf16=False)
    fid = loram_ref.get_initializer("lora_sb").fidelity(w, 8, init, {"stats": stats})
    assert fid["captured_energy"] <= fid["optimal_energy"] * (1 + 1e-6) and fid["energy_ratio"] > 0.99


def test_lora_da_records_how_far_its_eigensolver_is_from_converged():
    from .conftest import stats_for

    w = torch.randn(96, 80)
    kwargs = stats_for("lora_da", 96, 80)
    spec = loram_ref.get_initializer("lora_da")
    rough = loram_ref.initialize("lora_da", w, 4, lobpcg_niter=1, **kwargs)
    exact = loram_ref.initialize("lora_da", w, 4, solver="eigh", **kwargs)
    assert exact.info["eig_residual"] < 1e-4 < rough.info["eig_residual"]
    fid = spec.fidelity(w, 4, rough, kwargs)
    assert fid["eig_residual"] == rough.info["eig_residual"] and 0.0 < fid["angle_deg_to_eigh"] <= 90.0
    assert "angle_deg_to_eigh" not in spec.fidelity(w, 4, exact, kwargs)  # eigh is its own reference


def test_lora_da_official_seeds_are_per_module_and_stable():
    import hashlib

    from loram_ref.lora_da import stable_seed

    from .conftest import stats_for

    text = "lora_da_lobpcg::torch.Size([40, 40])::4::False::10::9::model.layers.0.mlp.up_proj::0.03"
    expected = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % (2**63 - 1)
    assert stable_seed("lora_da_lobpcg", (40, 40), 4, False, 10, 9, "model.layers.0.mlp.up_proj", 0.03) == expected
    w = torch.randn(48, 40)
    kwargs = stats_for("lora_da", 48, 40)
    one = loram_ref.initialize("lora_da", w, 4, official_seed=9, module="model.layers.0.mlp.up_proj", **kwargs)
    again = loram_ref.initialize("lora_da", w, 4, official_seed=9, module="model.layers.0.mlp.up_proj", **kwargs)
    other = loram_ref.initialize("lora_da", w, 4, official_seed=9, module="model.layers.1.mlp.up_proj", **kwargs)
    assert torch.equal(one.A, again.A) and not torch.equal(one.A, other.A)


def test_the_first_process_of_a_cell_computes_its_fidelity(tmp_path):
    from bench.initcost.runner import Runner
    from bench.initcost.tasks import Task

    (row,) = Runner(tmp_path / "i.jsonl", progress=False).run(
        [Task("pissa_rsvd", 128, 64, 4, values=1, processes=2, value_budget_s=30, threads=1)])
    assert row["status"] == "ok" and row["runs"][0]["fidelity"] and row["runs"][1]["fidelity"] == {}
    assert 0 <= row["fidelity_angle_deg_niter16"] <= row["fidelity_angle_deg_niter0"] <= 90
