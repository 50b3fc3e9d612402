"""The certified top-r solver (``loram_ref.krylov``) and the PiSSA variant built on it.

What must hold: where it certifies, the bound it reports is a bound (the largest principal
angle to an fp64 full SVD's top-r subspaces is below it) and PiSSA's factors are full-SVD
PiSSA's up to that angle and the triplets' signs; where it cannot (a flat spectrum, a spent
budget, a layer too narrow for a Krylov basis), ``pissa_krylov`` is ``pissa`` exactly and
says why; its arguments are checked.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import loram_ref
from loram_ref.krylov import MAX_BASIS_FRACTION, certified_top_triplets, least_passes
from loram_ref.linalg import principal_angles


def spiked(m: int, n: int, rank: int, seed: int, gap: float = 0.3) -> torch.Tensor:
    """``U·diag(σ)·Vᵀ`` plus a Gaussian bulk: 2r singular values above the bulk edge, with a
    relative gap ``gap`` between σ_r and σ_{r+1} (a decaying spectrum, as a trained weight's)."""
    gen = torch.Generator().manual_seed(seed)
    k = 2 * rank
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    top = 3.0 + 2.0 / torch.arange(1, rank + 1, dtype=torch.float64)
    below = (top[-1] * (1 - gap)) * torch.linspace(1.0, 0.8, rank, dtype=torch.float64)
    bulk = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(n)  # edge 1 + √(m/n)
    return (u * torch.cat([top, below]) @ v.mT + 0.3 * bulk).float()


def exact_subspaces(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :rank], vh[:rank].mT


def largest_angle(u, v, exact_u, exact_v) -> float:
    return max(float(principal_angles(u, exact_u).max()), float(principal_angles(v, exact_v).max()))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shape", [(700, 500), (500, 700)], ids=["tall", "wide"])
def test_a_certified_bound_holds_against_an_exact_svd(shape, seed):
    rank = 4
    w = spiked(*shape, rank, seed, gap=0.05 + 0.05 * seed)
    u, s, v, certificate = certified_top_triplets(w, rank, torch.Generator().manual_seed(seed))
    assert certificate.certified and certificate.reason == "certified"
    assert u.shape == (shape[0], rank) and v.shape == (shape[1], rank) and u.dtype == torch.float64
    angle = largest_angle(u, v, *exact_subspaces(w, rank))
    assert angle <= max(certificate.angle_bound, 1e-12) <= 1e-4
    assert torch.all(s[:-1] >= s[1:])
    torch.testing.assert_close(s, torch.linalg.svdvals(w.double())[:rank], rtol=1e-9, atol=0)
    assert certificate.passes <= certificate.budget


def test_pissa_krylov_gives_full_svd_pissas_factors_where_it_certifies():
    rank = 4
    w = spiked(900, 600, rank, seed=11)
    ours = loram_ref.initialize("pissa_krylov", w, rank, 2.0)
    full = loram_ref.initialize("pissa", w, rank, 2.0)
    assert ours.info["svd"] == "krylov" and ours.info["krylov_certified"]
    assert ours.info["krylov_angle_bound"] <= 1e-4
    # the product s·B·A and the residual do not depend on the triplets' signs
    torch.testing.assert_close(ours.product(), full.product(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.residual, full.residual, rtol=1e-5, atol=1e-6)
    # each factor is full PiSSA's up to its triplets' signs
    signs = torch.sign((ours.B * full.B).sum(0))
    torch.testing.assert_close(ours.B * signs, full.B, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.A * signs[:, None], full.A, rtol=1e-4, atol=1e-5)


def test_a_flat_spectrum_falls_back_to_the_full_svd_and_says_why():
    w = torch.randn(600, 600, generator=torch.Generator().manual_seed(3)) / math.sqrt(600)
    ours = loram_ref.initialize("pissa_krylov", w, 4)
    full = loram_ref.initialize("pissa", w, 4)
    assert ours.info["svd"] == "full" and not ours.info["krylov_certified"]
    assert ours.info["krylov_reason"] in ("budget", "stagnated")
    assert ours.info["krylov_passes"] <= ours.info["krylov_budget"]
    assert torch.equal(ours.A, full.A) and torch.equal(ours.B, full.B) and torch.equal(ours.residual, full.residual)


def test_a_layer_too_narrow_for_a_krylov_basis_goes_straight_to_the_full_svd():
    rank = 16  # a 2r·(DEPTH + 1)-column basis would span more than a quarter of 576
    assert 2 * rank * 11 > MAX_BASIS_FRACTION * 576
    init = loram_ref.initialize("pissa_krylov", torch.randn(576, 576, generator=torch.Generator().manual_seed(4)), rank)
    assert init.info["svd"] == "full" and init.info["krylov_reason"] == "shape" and init.info["krylov_passes"] == 0
    assert init.info["krylov_angle_bound"] is None  # no bound shown: null in a results file, never Infinity
    json.dumps(init.info, allow_nan=False)
    u, s, v, certificate = certified_top_triplets(torch.randn(576, 576), rank, torch.Generator().manual_seed(0))
    assert not certificate.certified and not (u.any() or s.any() or v.any())  # nothing computed: zeros, never garbage


def test_a_budget_too_small_to_certify_falls_back():
    w = spiked(700, 500, 4, seed=5)
    _, _, _, certificate = certified_top_triplets(w, 4, torch.Generator().manual_seed(0), max_passes=least_passes() - 1)
    assert not certificate.certified and certificate.reason == "budget"
    assert certificate.passes <= least_passes() - 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_other_dtypes_certify_on_their_exact_values(dtype):
    rank = 4
    w = spiked(800, 500, rank, seed=6).to(dtype)
    ours = loram_ref.initialize("pissa_krylov", w, rank)
    full = loram_ref.initialize("pissa", w, rank)
    assert ours.info["svd"] == "krylov" and ours.A.dtype == dtype and ours.residual.dtype == dtype
    tol = {torch.float64: 1e-9, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]  # one rounding of W's dtype
    torch.testing.assert_close(ours.product(), full.product(), rtol=tol, atol=tol * float(full.product().abs().max()))
    assert float((ours.effective_weight(w, torch.float64) - w.double()).abs().max()) <= 2 * torch.finfo(dtype).eps * float(
        w.double().abs().max() + ours.product(torch.float64).abs().max())


@pytest.mark.parametrize("bad", [0.0, -1e-4, math.inf, math.nan, "1e-4"])
def test_tol_must_be_a_positive_angle(bad):
    with pytest.raises(ValueError, match="tol must be a finite angle > 0"):
        loram_ref.initialize("pissa_krylov", spiked(300, 200, 2, 0), 2, tol=bad)


def test_max_passes_must_be_positive():
    with pytest.raises(ValueError, match="max_passes must be >= 1"):
        loram_ref.initialize("pissa_krylov", spiked(300, 200, 2, 0), 2, max_passes=0)


def test_the_same_seed_gives_the_same_factors_and_the_global_rng_is_untouched():
    w = spiked(700, 500, 4, seed=7)
    state = torch.get_rng_state()
    one = loram_ref.initialize("pissa_krylov", w, 4, generator=torch.Generator().manual_seed(3))
    two = loram_ref.initialize("pissa_krylov", w, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one.A, two.A) and torch.equal(one.B, two.B)
    assert torch.equal(torch.get_rng_state(), state)
