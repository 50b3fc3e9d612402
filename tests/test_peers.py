"""The initializers PEFT does not implement (MiLoRA, LoRA-One) against their official code's
published behaviour, and LoftQ's quantizers, which PEFT runs only through bitsandbytes on a GPU.

What the official code does, in the project's words (docs/initializers.md §6):

* MiLoRA: PiSSA's construction on the r smallest singular triplets of W, W rewritten.
* LoRA-One (``direction="LoRA-One"`` of the official ``reinit_lora_modules``): the randomized
  SVD of the negated mean gradient, ``B = U_r·√S_r/√S₁``, ``A = √S_r·V_rᵀ/√S₁``, each then times
  ``d_out^¼/√γ`` ("stable"), and no offset subtracted from W.
"""

from __future__ import annotations

import pytest
import torch

import loram_ref
from loram_ref.loftq import NF4, int8_roundtrip, nf4_roundtrip

from .conftest import rel_err


def _w(m=60, n=44, seed=0, dtype=torch.float64):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_milora_takes_the_minor_triplets(scaling):
    w = _w().float()
    rank = 5
    init = loram_ref.initialize("milora", w, rank, scaling)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    minor = (u[:, -rank:] * s[-rank:]) @ vh[-rank:]
    assert rel_err(init.delta(torch.float64), minor) < 1e-5
    assert rel_err(init.residual, w.double() - minor) < 1e-6  # the same residual for every s
    # its principal part is untouched: the residual's top singular values are W's
    top = torch.linalg.svdvals(init.residual.double())[: min(w.shape) - rank]
    torch.testing.assert_close(top, s[: min(w.shape) - rank], rtol=1e-5, atol=1e-5)
    # √σ/s on each side, as PiSSA
    torch.testing.assert_close(init.B.double().norm(dim=0) ** 2, s[-rank:] / scaling, rtol=1e-4, atol=1e-6)


def _gradient(m=80, n=56, seed=3):
    """A gradient whose six leading singular values are well separated (so its rSVD's vectors
    are determined) over a small tail."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    lead = torch.tensor([9.0, 6.0, 4.0, 3.0, 2.0, 1.5], dtype=torch.float64)
    s = torch.cat([lead, torch.linspace(0.3, 0.01, n - 6, dtype=torch.float64)])
    return ((u[:, :n] * s) @ v.mT * 1e-3).float()


@pytest.mark.parametrize("scale", ["stable", "unit"])
def test_lora_one_is_the_normalized_one_step_update(scale):
    grad = _gradient()
    m, n = grad.shape
    rank, gamma = 3, 64.0
    w = _w(m, n).float()
    init = loram_ref.initialize("lora_one", w, rank, 2.0, stats=loram_ref.GradientStats(grad=grad), scale=scale,
                                stable_gamma=gamma)
    u, s, vh = torch.linalg.svd(-grad.double(), full_matrices=False)
    factor = (m**0.5 / gamma) if scale == "stable" else 1.0  # (d_out^¼/√γ)² on B·A
    expected = (u[:, :rank] * s[:rank]) @ vh[:rank] / s[0] * factor
    assert rel_err(init.product(torch.float64), expected) < 1e-4
    assert init.residual is None  # W is not modified
    # B and A carry the same √S_r/√S₁ (balanced), so their column / row norms agree
    torch.testing.assert_close(init.B.double().norm(dim=0), init.A.double().norm(dim=1), rtol=1e-4, atol=1e-7)
    assert loram_ref.get_initializer("lora_one").published.rslora  # the official command's rsLoRA


def test_lora_ga_original_variant_is_the_paper_code():
    grad = _gradient()
    m, n = grad.shape
    rank, gamma = 3, 16.0
    w = _w(m, n).float()
    init = loram_ref.initialize("lora_ga", w, rank, 1.0, stats=loram_ref.GradientStats(grad=grad), variant="original")
    u, s, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    stable = m**0.25 / gamma**0.5
    # A = V[:, :r]ᵀ, B = U[:, r:2r], both times d_out^¼/√γ, no singular values: up to signs
    b_expected, a_expected = u[:, rank:2 * rank] * stable, vh[:rank] * stable
    signs_b = torch.sign((init.B.double() * b_expected).sum(0))
    signs_a = torch.sign((init.A.double() * a_expected).sum(1))
    torch.testing.assert_close(init.B.double(), b_expected * signs_b, rtol=0, atol=1e-4)
    torch.testing.assert_close(init.A.double(), a_expected * signs_a[:, None], rtol=0, atol=1e-4)
    assert rel_err(init.effective_weight(w), w) < 1e-6  # W_res = W − s·B·A


def test_nf4_roundtrip_is_the_nearest_code_value_per_block():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 100, generator=g)  # 800 elements: 12 full blocks of 64 and one of 32
    out = nf4_roundtrip(x)
    code = torch.tensor(NF4)
    flat, got = x.reshape(-1), out.reshape(-1)
    for start in range(0, flat.numel(), 64):
        block, q = flat[start:start + 64], got[start:start + 64]
        absmax = block.abs().max()
        nearest = code[(block[:, None] / absmax - code[None, :]).abs().argmin(1)] * absmax
        torch.testing.assert_close(q, nearest, rtol=0, atol=1e-7)
        assert float(q.abs().max()) == pytest.approx(float(absmax))  # ±1 maps to the block's absmax exactly
    assert len(set(NF4)) == 16 and NF4[0] == -1.0 and NF4[7] == 0.0 and NF4[-1] == 1.0


def test_int8_roundtrip_is_vectorwise():
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    out = int8_roundtrip(x)
    absmax = x.abs().amax(1, keepdim=True)
    torch.testing.assert_close(out, torch.round(x * 127 / absmax) * absmax / 127, rtol=0, atol=1e-6)
    assert float((out - x).abs().max()) <= float(absmax.max()) / 254 + 1e-7


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_reduces_the_quantization_error_and_more_iterations_do_not_hurt(bits):
    w = _w(96, 64, seed=4).float()
    errors = []
    for iterations in (1, 3):
        init = loram_ref.initialize("loftq", w, 8, 1.0, bits=bits, iterations=iterations)
        base = rel_err(init.residual, w)
        with_adapter = rel_err(init.effective_weight(w), w)
        assert with_adapter < base
        errors.append(with_adapter)
    assert errors[1] <= errors[0] * 1.001


def test_loftq_fold_scaling_is_peft_at_s_1_and_consistent_elsewhere():
    w = _w(64, 48, seed=5).float()
    peft_like = loram_ref.initialize("loftq", w, 4, 1.0, fold_scaling=False)
    folded = loram_ref.initialize("loftq", w, 4, 1.0)
    assert torch.equal(peft_like.A, folded.A) and torch.equal(peft_like.residual, folded.residual)
    at_two = loram_ref.initialize("loftq", w, 4, 2.0)
    torch.testing.assert_close(at_two.delta(), folded.delta(), rtol=1e-5, atol=1e-7)  # s·B·A the same for every s
    unfolded = loram_ref.initialize("loftq", w, 4, 2.0, fold_scaling=False)  # PEFT's: doubled
    torch.testing.assert_close(unfolded.delta(), 2 * folded.delta(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["lora_ga", "lora_one"])
def test_gradient_methods_fidelity_is_small_on_a_gapped_gradient(name):
    """The registered fidelity diagnostic measures the randomized SVD against the exact one."""
    spec = loram_ref.get_initializer(name)
    grad = _gradient()
    w = _w(*grad.shape).float()
    kwargs = {"stats": loram_ref.GradientStats(grad=grad)}
    fid = spec.fidelity(w, 3, loram_ref.initialize(name, w, 3, 1.0, **kwargs), kwargs)
    assert fid["angle_deg_A"] < 0.1 and fid["angle_deg_B"] < 0.1


def test_lora_one_fidelity_sees_a_sketch_without_oversampling_on_a_flat_gradient():
    """q = r and no iteration on a Gaussian gradient: far from the exact subspace, and the
    diagnostic says so."""
    spec = loram_ref.get_initializer("lora_one")
    w = _w(400, 300).float()
    kwargs = {"stats": loram_ref.GradientStats(grad=torch.randn(400, 300, generator=torch.Generator().manual_seed(2)))}
    rough = loram_ref.initialize("lora_one", w, 3, 1.0, q=3, niter=0, **kwargs)
    fid = spec.fidelity(w, 3, rough, kwargs)
    assert fid["angle_deg_B"] > 10 and fid["product_rel_err"] > 0.1


def test_eva_components_are_the_centred_principal_directions_and_whitening_divides_by_root_s():
    g = torch.Generator().manual_seed(6)
    n, tokens, rank = 24, 400, 4
    scale = torch.tensor([5.0, 4.0, 3.0, 2.0] + [0.2] * (n - 4))
    x = torch.randn(tokens, n, generator=g) * scale + 3.0  # a large mean: the components must be centred
    stats = loram_ref.InputMomentsStats(second_moment=x.mT @ x / tokens, mean=x.mean(0), tokens=tokens)
    w = torch.randn(10, n)
    init = loram_ref.initialize("eva", w, rank, stats=stats)
    _, s, vh = torch.linalg.svd((x - x.mean(0)).double(), full_matrices=False)
    cos = (init.A.double() * vh[:rank]).sum(1).abs()
    assert bool((cos > 1 - 1e-4).all())
    signs = init.A[torch.arange(rank), init.A.abs().argmax(1)]
    assert bool((signs > 0).all())  # each component's largest entry positive, as PEFT's incremental PCA
    white = loram_ref.initialize("eva", w, rank, stats=stats, whiten=True)
    torch.testing.assert_close(white.A.double().norm(dim=1), s[:rank] ** -0.5, rtol=1e-3, atol=0)
    assert not bool(init.B.any()) and init.residual is None
