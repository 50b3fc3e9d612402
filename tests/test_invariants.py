"""Each initializer's step-0 invariant class (docs/initializers.md §0) on random weights, shapes and dtypes."""

from __future__ import annotations

import math

import pytest
import torch

import loram_ref
from loram_ref import Invariant

from .conftest import DTYPES, REL_TOL, SHAPES, rel_err, run_init

NAMES = sorted(loram_ref.INITIALIZERS)


def test_registry_has_every_initializer_of_the_mission():
    """The mission's initializers are registered (a new one registers by its module existing):
    the first eight, PEFT's other options, MiLoRA and LoRA-One."""
    assert {
        "noise_zeros", "gaussian", "pissa", "pissa_rsvd", "lora_sb", "lora_da", "loram_dst", "loram_rorth",
        "olora", "orthogonal", "mica", "milora", "lora_ga", "corda", "eva", "lora_one", "loftq",
    } <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_invariant_class(name, shape, dtype):
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(*shape, generator=g).to(dtype)
    original = weight.clone()
    rank, scaling = 8, 2.0
    init = run_init(name, weight, rank, scaling)
    spec = loram_ref.get_initializer(name)
    m, n = shape

    assert init.method == name
    assert init.A.shape == (rank, n) and init.B.shape == (m, rank)
    assert init.scaling == scaling
    assert torch.equal(weight, original), "the default call must not modify its input"

    if spec.invariant is Invariant.FUNCTION_PRESERVING:
        assert init.residual is not None and init.residual.dtype == dtype
        assert rel_err(init.effective_weight(weight), weight) < REL_TOL[dtype]
        assert float(init.delta().norm()) > 0
    elif spec.invariant is Invariant.ZERO_PRODUCT:
        assert init.residual is None
        # exactly zero when one factor is (noise-zeros: B; MiCA, EVA: the other); PEFT's
        # orthogonal init makes it zero through orthogonality, so up to the factors' rounding
        bound = REL_TOL[dtype] * float(init.A.double().norm() * init.B.double().norm())
        assert float(init.product(torch.float64).norm()) <= bound
        assert torch.count_nonzero(init.A) + torch.count_nonzero(init.B) > 0
    elif spec.invariant is Invariant.QUANTIZED:
        # W → its quantized form; the adapter removes part of the quantization error
        assert init.residual is not None and init.residual.dtype == dtype
        base_error = rel_err(init.residual, weight)
        assert base_error > 0
        assert rel_err(init.effective_weight(weight), weight) < base_error
    else:  # SHIFTED: W untouched, s·B·A deliberately non-zero
        assert init.residual is None
        assert float(init.delta().norm()) > 0


@pytest.mark.parametrize("name", ["pissa", "pissa_rsvd", "loram_dst", "loram_rorth"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_writes_residual_into_the_weight(name, dtype):
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    original = weight.clone()
    init = run_init(name, weight, 4, inplace=True)
    assert init.residual.data_ptr() == weight.data_ptr()
    assert rel_err(init.residual.float() + init.delta(), original) < REL_TOL[dtype]


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_factors_and_global_rng_untouched(name):
    weight = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(99)
    before = torch.get_rng_state()
    first = run_init(name, weight, 4)
    assert torch.equal(torch.get_rng_state(), before), "initializers must not touch the global RNG"
    second = run_init(name, weight, 4)
    assert torch.equal(first.A, second.A) and torch.equal(first.B, second.B)


@pytest.mark.parametrize("name", ["noise_zeros", "gaussian", "pissa_rsvd", "loram_rorth"])
def test_generator_argument_is_used(name):
    weight = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    a = run_init(name, weight, 4, generator=torch.Generator().manual_seed(1)).A
    b = run_init(name, weight, 4, generator=torch.Generator().manual_seed(2)).A
    assert not torch.equal(a, b)


def test_noise_zeros_distribution():
    n, rank = 4096, 64
    init = loram_ref.initialize("noise_zeros", torch.zeros(rank, n), rank)
    bound = 1 / math.sqrt(n)  # Kaiming-uniform with a = √5 (docs/initializers.md §1)
    assert float(init.A.abs().max()) <= bound
    assert abs(float(init.A.var()) - bound**2 / 3) < 0.02 * bound**2 / 3


def test_gaussian_uses_std_one_over_r():
    rank = 16
    init = loram_ref.initialize("gaussian", torch.zeros(rank, 4096), rank)
    assert abs(float(init.A.std()) - 1 / rank) < 0.02 / rank  # std 1/r as PEFT, not variance 1/r


def test_pissa_takes_the_principal_triplets():
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(50, 30, generator=g, dtype=torch.float64).float()
    rank = 6
    init = loram_ref.initialize("pissa", weight, rank, scaling=1.0)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert rel_err(init.delta(torch.float64), best) < 1e-5
    # ‖s·B·A‖_F / ‖W‖_F = ‖σ_{1:r}‖/‖σ‖ (docs/initializers.md §9)
    assert abs(float(init.delta().norm() / weight.norm()) - float(s[:rank].norm() / s.norm())) < 1e-5


def test_pissa_rsvd_converges_to_full_svd_subspace():
    g = torch.Generator().manual_seed(5)
    # a spectrum with a clear gap after r makes the randomized subspace well defined
    u = torch.linalg.qr(torch.randn(80, 80, generator=g)).Q
    v = torch.linalg.qr(torch.randn(60, 60, generator=g)).Q
    s = torch.cat([torch.linspace(10, 5, 6), torch.linspace(0.5, 0.01, 54)])
    weight = (u[:, :60] * s) @ v.mT
    rank = 6
    approx = loram_ref.initialize("pissa_rsvd", weight, rank, niter=8)
    angles = loram_ref.principal_angles(torch.linalg.qr(approx.B.double()).Q, u[:, :rank].double())
    assert float(angles.max()) < 1e-4


@pytest.mark.parametrize("scaling", [1.0, 0.5, 4.0])
def test_pissa_folds_scaling_into_singular_values(scaling):
    weight = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    init = loram_ref.initialize("pissa", weight, 5, scaling=scaling)
    base = loram_ref.initialize("pissa", weight, 5, scaling=1.0)
    torch.testing.assert_close(init.delta(), base.delta(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if loram_ref.get_initializer(n).rank_rule is not None])
def test_rank_rules_are_what_the_function_enforces(name):
    """A registry rank rule names exactly the ranks the function refuses, with the same reason."""
    spec = loram_ref.get_initializer(name)
    m, n = 24, 20
    for rank in range(1, min(m, n) + 1):
        problem = spec.rank_problem(m, n, rank)
        weight = torch.randn(m, n, generator=torch.Generator().manual_seed(rank))
        if problem is None:
            assert run_init(name, weight, rank).rank == rank
        else:
            with pytest.raises(ValueError, match=problem.split(",")[0].split(":")[0][:30]):
                run_init(name, weight, rank)
