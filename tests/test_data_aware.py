"""LoRA-SB (docs/initializers.md §3) and LoRA-DA (docs/initializers.md §4) against exact linear algebra on small problems."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import loram_ref
from loram_ref import LoraDAStats, LoraSBStats

from .conftest import orthonormality_error, rel_err


def _low_rank_plus_noise(m, n, rank, seed, noise=1e-3):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=g)).Q
    s = torch.linspace(3.0, 1.0, rank)
    return (u * s) @ v.mT + noise * torch.randn(m, n, generator=g)


def _best_rank(x, rank):
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


# ----------------------------------------------------------------------------- LoRA-SB


@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])
@pytest.mark.parametrize("scaling", [1.0, 3.0])
def test_lora_sb_is_best_rank_r_approximation_of_update(shape, scaling):
    rank = 5
    update = _low_rank_plus_noise(*shape, rank, seed=1)
    init = loram_ref.initialize(
        "lora_sb", torch.randn(*shape), rank, scaling, stats=LoraSBStats(update=update), round_bf16=False
    )
    assert init.R is not None and init.R.shape == (rank, rank)
    assert rel_err(init.delta(torch.float64), _best_rank(update, rank)) < 1e-4
    assert orthonormality_error(init.B) < 1e-5  # BᵀB = I
    assert orthonormality_error(init.A.mT) < 1e-5  # AAᵀ = I
    torch.testing.assert_close(init.R, torch.diag(torch.diagonal(init.R)))  # R = diag(σ)/s


def test_lora_sb_faithful_bf16_rounding():
    update = _low_rank_plus_noise(60, 40, 4, seed=2)
    init = loram_ref.initialize("lora_sb", torch.randn(60, 40), 4, stats=LoraSBStats(update=update))
    for t in (init.A, init.B, init.R):
        assert torch.equal(t, t.to(torch.bfloat16).to(t.dtype)), "faithful mode rounds the factors to bf16"
    assert rel_err(init.delta(torch.float64), _best_rank(update, 4)) < 2e-2


def test_lora_sb_on_a_sign_update_is_near_eckart_young_optimum():
    g = torch.Generator().manual_seed(3)
    stats = LoraSBStats.from_gradient_sum(torch.randn(80, 50, generator=g), eta_eff=1e-3)
    torch.testing.assert_close(torch.unique(stats.update), torch.tensor([-1e-3, 1e-3]))
    init = loram_ref.initialize("lora_sb", torch.randn(80, 50), 6, stats=stats, round_bf16=False)
    optimum = float((stats.update.double() - _best_rank(stats.update, 6)).norm())
    achieved = float((stats.update.double() - init.delta(torch.float64)).norm())
    assert optimum <= achieved <= 1.02 * optimum


def test_lora_sb_eta_from_repo_formula():
    # arithmetic script: 1e-4 / (0.02 · ⌈50000/3⌉) ≈ 3.0e-7 (docs/initializers.md §3 table)
    assert LoraSBStats.eta_from_repo(1e-4, 0.02, math.ceil(50000 / 3)) == pytest.approx(3.0e-7, rel=1e-3)


# ----------------------------------------------------------------------------- LoRA-DA


def _omega_reference(stats: LoraDAStats, damping=1e-6, beta=0.03, alpha=1.0):
    """Ω from docs/initializers.md §4 steps 3-5 with explicit float64 inverses (independent of the implementation)."""
    z = stats.input_factor.double()
    z = (z + z.mT) / 2 + damping * torch.eye(z.shape[0], dtype=torch.float64)
    z_inv = torch.linalg.inv(z)
    d = 1.0 / (stats.output_factor.double() + damping)
    delta = -(d[:, None] * stats.grad.double()) @ z_inv
    sigma1 = float(torch.linalg.matrix_norm(delta, ord=2))
    delta_hat = delta / sigma1
    omega = -alpha * delta_hat.mT @ delta_hat + beta * float(d.sum()) / (stats.num_train * sigma1**2) * z_inv
    return (omega + omega.mT) / 2, delta_hat, sigma1


def _da_problem(m=48, n=40, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g), LoraDAStats.synthetic(m, n, g, num_train=1000)


@pytest.mark.parametrize("solver,niter,tol", [("eigh", 10, 1e-5), ("lobpcg", 200, 1e-3)])
def test_lora_da_subspace_is_smallest_eigenvectors_of_omega(solver, niter, tol):
    weight, stats = _da_problem()
    rank = 4
    init = loram_ref.initialize("lora_da", weight, rank, stats=stats, solver=solver, lobpcg_niter=niter)
    omega, _, _ = _omega_reference(stats)
    evals, evecs = torch.linalg.eigh(omega)
    assert float(evals[rank] - evals[rank - 1]) > 0, "test problem needs an eigengap"
    gamma = init.info["gamma"]
    q = init.A.double().mT * math.sqrt(gamma)  # A = Qᵀ/√γ
    angles = loram_ref.principal_angles(q, evecs[:, :rank])
    assert float(angles.max()) < tol
    assert init.info["eigensolver"] == solver


def test_lora_da_factor_identities():
    weight, stats = _da_problem()
    rank = 4
    init = loram_ref.initialize("lora_da", weight, rank, 5.66, stats=stats, solver="eigh")
    gamma = init.info["gamma"]
    _, delta_hat, sigma1 = _omega_reference(stats)
    # A·Aᵀ = I/γ
    torch.testing.assert_close(
        init.A.double() @ init.A.double().mT * gamma, torch.eye(rank, dtype=torch.float64), atol=1e-5, rtol=0
    )
    # B·A = Δ̂·QQᵀ/γ and ‖B·A‖₂ <= 1/γ (σ₁ of Δ̂ is 1)
    q = init.A.double().mT * math.sqrt(gamma)
    assert rel_err(init.product(torch.float64), delta_hat @ q @ q.mT / gamma) < 1e-3
    assert float(torch.linalg.matrix_norm(init.product(torch.float64), ord=2)) <= (1 + 1e-3) / gamma
    assert init.info["sigma_1"] == pytest.approx(sigma1, rel=1e-3)


def test_lora_da_falls_back_to_eigh_when_lobpcg_cannot_run():
    weight, stats = _da_problem(m=30, n=20)
    init = loram_ref.initialize("lora_da", weight, 8, stats=stats)  # n = 20 < 3r = 24
    assert init.info["eigensolver"] == "eigh"
    assert "n >= 3r" in init.info["fallback"]


def test_lora_da_theory_variant_uses_beta_one():
    weight, stats = _da_problem()
    stats = dataclasses.replace(stats, num_train=1)  # few samples: the variance term matters
    theory = loram_ref.initialize("lora_da", weight, 4, stats=stats, solver="eigh", beta_var=1.0)
    code = loram_ref.initialize("lora_da", weight, 4, stats=stats, solver="eigh")
    _, evecs = torch.linalg.eigh(_omega_reference(stats, beta=1.0)[0])
    q = theory.A.double().mT * math.sqrt(theory.info["gamma"])
    assert float(loram_ref.principal_angles(q, evecs[:, :4]).max()) < 1e-3  # fp32 vs fp64, small eigengap
    assert float(loram_ref.principal_angles(q, code.A.double().mT * 32.0).max()) > 1e-2


def test_lora_da_rank_deficient_input_factor_escalates_damping():
    weight, stats = _da_problem(m=48, n=40)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 40, generator=g) * 30.0  # 5 tokens for 40 features: Z has rank 5
    deficient = dataclasses.replace(stats, input_factor=x.mT @ x / 5)
    init = loram_ref.initialize("lora_da", weight, 4, stats=deficient, solver="eigh")
    assert init.info["damping"] >= 1e-6 and torch.isfinite(init.A).all() and torch.isfinite(init.B).all()
    assert orthonormality_error(init.A.mT * math.sqrt(init.info["gamma"])) < 1e-4
    healthy = loram_ref.initialize("lora_da", weight, 4, stats=stats, solver="eigh")
    assert healthy.info["damping"] == 1e-6  # the code's λ when it works


def test_lora_da_indefinite_input_factor_is_a_clear_error():
    weight, stats = _da_problem(m=48, n=40)
    bad = dataclasses.replace(stats, input_factor=-1e12 * torch.eye(40))
    with pytest.raises(ValueError, match="stats.input_factor is not positive definite"):
        loram_ref.initialize("lora_da", weight, 4, stats=bad)
