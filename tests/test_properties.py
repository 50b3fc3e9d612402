"""Property-based invariants over random shapes, ranks and scalings (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import loram_ref
from loram_ref import Invariant

from .conftest import orthonormality_error, rel_err, run_init

NAMES = sorted(loram_ref.INITIALIZERS)


@st.composite
def problems(draw, min_rank=1):
    m = draw(st.integers(min_value=max(2, min_rank), max_value=48))
    n = draw(st.integers(min_value=max(2, min_rank), max_value=48))
    rank = draw(st.integers(min_value=min_rank, max_value=min(m, n)))
    scaling = draw(st.sampled_from([0.25, 1.0, 2.0, 5.66]))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    return m, n, rank, scaling, seed


_settings = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", NAMES)
@_settings
@given(problem=problems(min_rank=2))
def test_invariant_holds_for_any_shape_and_rank(name, problem):
    m, n, rank, scaling, seed = problem
    spec = loram_ref.get_initializer(name)
    assume(spec.rank_problem(m, n, rank) is None)  # the registry's rank rule: tested in test_rank_rules
    weight = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    init = run_init(name, weight, rank, scaling)
    invariant = spec.invariant
    assert init.A.shape == (rank, n) and init.B.shape == (m, rank)
    assert torch.isfinite(init.A).all() and torch.isfinite(init.B).all()
    if invariant is Invariant.FUNCTION_PRESERVING:
        assert rel_err(init.effective_weight(weight), weight) < 1e-5
    elif invariant is Invariant.ZERO_PRODUCT:
        assert float(init.product(torch.float64).norm()) <= 1e-5 * float(init.A.double().norm() * init.B.double().norm())
    elif invariant is Invariant.QUANTIZED:
        assert rel_err(init.effective_weight(weight), weight) < rel_err(init.residual, weight)
    else:
        assert init.residual is None and float(init.delta().norm()) > 0


@pytest.mark.parametrize("name", ["loram_dst", "loram_rorth"])
@_settings
@given(problem=problems(min_rank=2))
def test_loram_norm_law_and_orthogonal_factors(name, problem):
    m, n, rank, scaling, seed = problem
    weight = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    init = loram_ref.initialize(name, weight, rank, scaling)
    q = math.log(rank) / math.log(min(m, n))
    expected = scaling * math.sqrt(q) * float(weight.double().norm())
    assert float(init.delta(torch.float64).norm()) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    beta = init.info["beta"]
    if beta > 0:
        assert orthonormality_error(init.B / beta) < 1e-4
        assert orthonormality_error(init.A.mT / beta) < 1e-4


@_settings
@given(problem=problems())
def test_pissa_delta_is_best_rank_r(problem):
    m, n, rank, scaling, seed = problem
    weight = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    init = loram_ref.initialize("pissa", weight, rank, scaling)
    s = torch.linalg.svdvals(weight.double())
    # ‖W - s·B·A‖_F = ‖σ_{r+1:}‖ (Eckart-Young) since B·A is the top-r truncation
    assert float(init.residual.double().norm()) == pytest.approx(float(s[rank:].norm()), rel=1e-3, abs=1e-4)
