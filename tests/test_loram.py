"""LoRAM (docs/initializers.md §5): bases, β closed form, gain, memory discipline."""

from __future__ import annotations

import math

import pytest
import torch

import loram_ref
from loram_ref.loram import loram_gain

from .conftest import DTYPES, orthonormality_error


@pytest.mark.parametrize("dim,rank", [(8, 8), (64, 16), (1000, 32), (28672, 4)])
def test_dst_basis_orthonormal(dim, rank):
    phi = loram_ref.dst_basis(dim, rank, dtype=torch.float64)
    assert phi.shape == (dim, rank)
    assert orthonormality_error(phi) < 1e-10


def test_dst_basis_is_the_dst1_matrix():
    dim = 12
    full = loram_ref.dst_basis(dim, dim, dtype=torch.float64)
    i = torch.arange(1, dim + 1, dtype=torch.float64)
    expected = math.sqrt(2 / (dim + 1)) * torch.sin(math.pi * torch.outer(i, i) / (dim + 1))
    torch.testing.assert_close(full, expected)
    torch.testing.assert_close(full, full.mT)  # symmetric
    torch.testing.assert_close(full @ full, torch.eye(dim, dtype=torch.float64))  # S² = I


def test_random_orthogonal_basis_orthonormal_and_seeded():
    g = torch.Generator().manual_seed(0)
    phi = loram_ref.random_orthogonal_basis(300, 20, g)
    assert orthonormality_error(phi) < 1e-5
    again = loram_ref.random_orthogonal_basis(300, 20, torch.Generator().manual_seed(0))
    assert torch.equal(phi, again)


@pytest.mark.parametrize("name", ["loram_dst", "loram_rorth"])
@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (64, 64)])
@pytest.mark.parametrize("rank", [2, 8, 16])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_beta_closed_form_and_factor_geometry(name, shape, rank, scaling):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(rank))
    init = loram_ref.initialize(name, weight, rank, scaling)
    q = math.log(rank) / math.log(min(shape))
    beta = (q * float(weight.double().norm()) ** 2 / rank) ** 0.25
    assert init.info["beta"] == pytest.approx(beta, rel=1e-6)
    assert init.info["gain_Q"] == pytest.approx(q)
    # ‖s·B·A‖_F = s·√Q·‖W‖_F  (docs/initializers.md §5 invariants; issue #2)
    assert float(init.delta().norm()) == pytest.approx(scaling * math.sqrt(q) * float(weight.norm()), rel=1e-5)
    # BᵀB = AAᵀ = β²I
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close(init.B.double().mT @ init.B.double(), beta**2 * eye, rtol=1e-5, atol=1e-5 * beta**2)
    torch.testing.assert_close(init.A.double() @ init.A.double().mT, beta**2 * eye, rtol=1e-5, atol=1e-5 * beta**2)


def test_mean_square_magnitude_matches_paper_definition():
    weight = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))
    init = loram_ref.initialize("loram_dst", weight, 8)
    q = math.log(8) / math.log(64)
    nu = lambda x: float(x.double().square().mean())  # ν[X] = ‖X‖²/(rows·cols)
    assert nu(init.product()) == pytest.approx(q * nu(weight), rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dst_factors_are_deterministic_across_calls_and_weights_of_equal_norm(dtype):
    w1 = torch.randn(40, 30, generator=torch.Generator().manual_seed(1)).to(dtype)
    w2 = w1.flip(0)  # same norm, different entries
    a = loram_ref.initialize("loram_dst", w1, 4)
    b = loram_ref.initialize("loram_dst", w2, 4)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def test_gain_formula_examples_from_spec():
    assert loram_gain(1.0, (4096, 4096), 16)[0] == pytest.approx(1 / 3)
    assert loram_gain(1.0, (4096, 11008), 128)[0] == pytest.approx(7 / 12)
    assert loram_gain(1.0, (4096, 4096), 8)[0] == pytest.approx(1 / 4)


def test_residual_norm_grows_as_sqrt_one_plus_q():
    weight = torch.randn(512, 256, generator=torch.Generator().manual_seed(2))
    init = loram_ref.initialize("loram_dst", weight, 16)
    q = init.info["gain_Q"]
    assert float(init.residual.norm() / weight.norm()) == pytest.approx(math.sqrt(1 + q), rel=0.02)
