"""Hostile inputs: each gets the right computation or a clear error naming what to do."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import loram_ref

from .conftest import stats_for

ALL = sorted(loram_ref.INITIALIZERS)
WRITES_RESIDUAL = [n for n, s in sorted(loram_ref.INITIALIZERS.items()) if s.invariant is loram_ref.Invariant.FUNCTION_PRESERVING]


@pytest.mark.parametrize("name", ALL)
def test_float64_is_computed_in_float64(name):
    w = torch.randn(64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    init = loram_ref.initialize(name, w, 4, **stats_for(name, 64, 48))
    if init.residual is not None:
        assert init.residual.dtype == torch.float64 and init.A.dtype == torch.float64
    if loram_ref.get_initializer(name).invariant is loram_ref.Invariant.FUNCTION_PRESERVING:
        assert init.residual.dtype == torch.float64 and init.A.dtype == torch.float64
        err = float((init.effective_weight(w, torch.float64) - w).norm() / w.norm())
        assert err < 1e-13  # float64 round-off, not float32's ~1e-7


@pytest.mark.parametrize("name", WRITES_RESIDUAL)
def test_an_overflowing_float16_residual_is_an_error_with_advice(name):
    w = (torch.rand(64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1).mul(65000).half()
    stats = stats_for(name, 64, 48)
    if name == "lora_ga":  # its product follows the gradient's scale, not W's: make that one overflow
        stats = {"stats": dataclasses.replace(stats["stats"], grad=stats["stats"].grad * 1e12)}
    with pytest.raises(ValueError, match="overflows torch.float16.*initialize in bfloat16 or float32"):
        loram_ref.initialize(name, w, 4, **stats)


@pytest.mark.parametrize("name", ["loram_dst", "loram_rorth"])
def test_a_zero_weight_is_refused_by_loram(name):
    with pytest.raises(ValueError, match="all zeros.*dead adapter"):
        loram_ref.initialize(name, torch.zeros(16, 8), 2)


def test_lora_da_refuses_a_factor_that_is_not_psd():
    good = stats_for("lora_da", 24, 16)["stats"]
    for bad in (-torch.eye(16), torch.tensor([[1.0, 2.0], [2.0, 1.0]]).repeat(8, 8)):
        stats = dataclasses.replace(good, input_factor=bad)
        with pytest.raises(ValueError, match="stats.input_factor is not positive definite"):
            loram_ref.initialize("lora_da", torch.randn(24, 16), 2, stats=stats)


@pytest.mark.parametrize("name", ALL)
def test_meta_tensors_get_advice(name):
    with pytest.raises(ValueError, match="meta tensor.*materialize"):
        loram_ref.initialize(name, torch.empty(16, 8, device="meta"), 2, **stats_for(name, 16, 8))


@pytest.mark.parametrize("name", ALL)
def test_a_leaf_that_requires_grad_is_initialized_on_its_data_and_nothing_stays_in_a_graph(name):
    w = torch.randn(16, 8, requires_grad=True)
    kwargs = {"inplace": True} if name in WRITES_RESIDUAL else {}
    init = loram_ref.initialize(name, w, 2, **stats_for(name, 16, 8), **kwargs)
    for t in (init.A, init.B, init.R, init.residual):
        assert t is None or (not t.requires_grad and t.grad_fn is None)
    assert w.requires_grad and w.grad_fn is None  # still the user's leaf


@pytest.mark.parametrize("name", ALL)
def test_numpy_scalars_are_accepted(name):
    w = torch.randn(16, 8)
    init = loram_ref.initialize(name, w, np.int64(4), np.float32(2.0), **stats_for(name, 16, 8))
    assert init.rank == 4 and init.scaling == 2.0 and isinstance(init.scaling, float)


def test_noise_inits_do_not_read_the_weight():
    w = torch.full((16, 8), float("nan"))
    for name, spec in loram_ref.INITIALIZERS.items():
        if not spec.reads_weight:
            assert bool(torch.isfinite(loram_ref.initialize(name, w, 2, **stats_for(name, 16, 8)).A).all())
