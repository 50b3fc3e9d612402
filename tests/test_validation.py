"""Bad input raises a clear error naming the parameter."""

from __future__ import annotations

import pytest
import torch

import loram_ref
from loram_ref import LoraDAStats, LoraSBStats

from .conftest import run_init

NAMES = sorted(loram_ref.INITIALIZERS)


@pytest.mark.parametrize("name", NAMES)
def test_rank_above_min_dim(name):
    with pytest.raises(ValueError, match=r"rank=9 exceeds min\(d_out, d_in\)=8"):
        run_init(name, torch.randn(8, 20), 9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rank", [0, -3])
def test_rank_below_one(name, rank):
    with pytest.raises(ValueError, match="rank must be >= "):
        run_init(name, torch.randn(8, 20), rank)


@pytest.mark.parametrize("name", NAMES)
def test_rank_not_int(name):
    with pytest.raises(TypeError, match="rank must be an int"):
        run_init(name, torch.randn(8, 20), 2.5)


@pytest.mark.parametrize("name", ["loram_dst", "loram_rorth"])
def test_loram_rank_one_is_rejected(name):
    with pytest.raises(ValueError, match="rank must be >= 2"):
        run_init(name, torch.randn(8, 20), 1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("weight", [torch.randn(4, 5, 6), torch.randn(7)], ids=["3d", "1d"])
def test_non_2d_weight(name, weight):
    with pytest.raises(ValueError, match="weight must be 2-D"):
        loram_ref.initialize(name, weight, 2)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_weight(name, dtype):
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        loram_ref.initialize(name, torch.ones(8, 8, dtype=dtype), 2)


@pytest.mark.parametrize("name", NAMES)
def test_non_tensor_weight(name):
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        loram_ref.initialize(name, [[1.0, 2.0], [3.0, 4.0]], 2)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight(name, bad):
    weight = torch.randn(16, 12)
    weight[5, 7] = bad
    if not loram_ref.get_initializer(name).reads_weight:
        # noise-zeros methods never read W, so they do not scan it (issue 10) unless asked
        init = run_init(name, weight, 4)
        assert bool(torch.isfinite(init.A).all()) and bool(torch.isfinite(init.B).all())
        with pytest.raises(ValueError, match="weight contains NaN or Inf"):
            run_init(name, weight, 4, check_input=True)
        return
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        run_init(name, weight, 4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scaling", [0.0, -1.0, float("nan")])
def test_bad_scaling(name, scaling):
    with pytest.raises(ValueError, match="scaling must be finite and > 0"):
        run_init(name, torch.randn(8, 8), 2, scaling)


def test_unknown_initializer_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown initializer 'dora'; known initializers: .*loram_dst"):
        loram_ref.initialize("dora", torch.randn(8, 8), 2)


def test_missing_or_wrong_stats():
    with pytest.raises(TypeError, match="stats must be a LoraSBStats"):
        loram_ref.initialize("lora_sb", torch.randn(8, 8), 2, stats=None)
    with pytest.raises(ValueError, match=r"stats.update must have shape \(8, 8\), got \(8, 9\)"):
        loram_ref.initialize("lora_sb", torch.randn(8, 8), 2, stats=LoraSBStats(update=torch.randn(8, 9)))
    good = LoraDAStats.synthetic(8, 6, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"stats.input_factor must have shape \(6, 6\)"):
        loram_ref.initialize("lora_da", torch.randn(8, 6), 2, stats=LoraDAStats(good.grad, torch.eye(5), good.output_factor, 10))
    with pytest.raises(ValueError, match="stats.output_factor must be >= 0"):
        loram_ref.initialize("lora_da", torch.randn(8, 6), 2, stats=LoraDAStats(good.grad, good.input_factor, -good.output_factor - 1, 10))
    with pytest.raises(ValueError, match="stats.num_train must be >= 1"):
        loram_ref.initialize("lora_da", torch.randn(8, 6), 2, stats=LoraDAStats(good.grad, good.input_factor, good.output_factor, 0))
    nan_grad = good.grad.clone()
    nan_grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="stats.grad contains NaN or Inf"):
        loram_ref.initialize("lora_da", torch.randn(8, 6), 2, stats=LoraDAStats(nan_grad, good.input_factor, good.output_factor, 10))


def test_bad_method_parameters():
    w = torch.randn(12, 10)
    with pytest.raises(ValueError, match="niter must be >= 0"):
        loram_ref.initialize("pissa_rsvd", w, 2, niter=-1)
    with pytest.raises(ValueError, match="solver must be 'lobpcg' or 'eigh'"):
        run_init("lora_da", w, 2, solver="qr")
    with pytest.raises(ValueError, match="gamma must be finite and > 0"):
        run_init("lora_da", w, 2, gamma=0.0)
    with pytest.raises(ValueError, match="eta_eff must be > 0"):
        LoraSBStats.from_gradient_sum(torch.randn(3, 3), 0.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        loram_ref.initialize("gaussian", w, 2, generator=42)
