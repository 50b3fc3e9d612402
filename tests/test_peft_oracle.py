"""PEFT as the oracle for its other initializers: olora, orthogonal, mica, lora_ga, corda, eva.

Every PEFT result comes through ``get_peft_model`` on a model made here. Where PEFT draws from
the global RNG, the state at the entry of its layer method is captured (a wrapper around the
method) and our local generator starts from it. PEFT keeps adapters of a bf16/fp16 model in
fp32 (``autocast_adapter_dtype``) after computing them; ours are returned in W's dtype, so
PEFT's are cast once before comparing.

Tolerances, where a comparison is not bit for bit, and why:

* the residual of olora, lora_ga: ours is one fused in-place ``addmm_`` (no m x n temporary),
  PEFT's forms ``s·B·A`` and subtracts it; the fp32 results differ in the last bit, which
  can move a bf16/fp16 rounding by one ulp (:func:`_residual_close`).
* olora's default algorithm (the QR of the first r columns) against PEFT's full QR: the same
  reflections, applied in a different order to the columns beyond r: rounding-level.
* lora_ga: our randomized SVD is the same algorithm as ``torch.svd_lowrank`` on the same
  draws, with its own QR and GEMM calls (as for ``pissa_rsvd``): 1e-4.
* corda fed PEFT's own covariance: bit for bit. Our statistics pass against PEFT's
  ``preprocess_corda``: the sums are the same per sample, accumulated with ``addmm_``;
  the decomposition amplifies the last-bit difference: 1e-3 on the factors.
* eva: PEFT's incremental randomized PCA stops when successive estimates agree to cosine
  τ = 0.99; ours is the exact eigendecomposition of the same moments: |cos| ≥ 0.99 per
  component, with the same sign.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402

import loram_ref  # noqa: E402
from loram_ref.statistics.moments import collect_moments  # noqa: E402

from .conftest import OneLinear  # noqa: E402

SHAPES = {"tall": (192, 136), "wide": (136, 192)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RANKS = [1, 7, 64]


def _captured(monkeypatch, method: str) -> dict:
    """Wrap PEFT's ``LoraLayer.<method>`` to record the global RNG state at its entry."""
    seen: dict = {}
    original = getattr(lora_layer.LoraLayer, method)

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        seen["rng"] = torch.get_rng_state()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lora_layer.LoraLayer, method, wrapper)
    return seen


def _peft(model: nn.Module, **config):
    config = LoraConfig(target_modules=["lin"], **config)
    torch.manual_seed(1234)
    return get_peft_model(model, config).base_model.model.lin


def _factors(layer, dtype):
    return layer.lora_A["default"].weight.detach().to(dtype), layer.lora_B["default"].weight.detach().to(dtype)


def _weight(shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _scaling(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / rank**0.5 if rslora else alpha / rank


def _residual_close(ours: "loram_ref.LoraInit", theirs: torch.Tensor, weight: torch.Tensor,
                    factors: tuple[torch.Tensor, ...] | None = None) -> None:
    """Equal up to the rounding of the fused subtraction (the module docstring's first point),
    element by element: the two fp32 computations of ``W − s·B·A`` each err by at most a few
    ulps of ``|W| + s·|B|·|A|`` (a length-r dot product), and a bf16 / fp16 cast can then
    round the two to neighbouring values, one ulp of the dtype apart (a subnormal's spacing near
    zero: 6e-8 in fp16). GEMM blocking, and so the last bits, depend on the thread count, which
    other tests change: the bound covers any order of summation. Where our factors differ
    from PEFT's, their difference propagates: ``s·(|B|·|δA| + |δB|·|A|)``, with ``factors =
    (our A, our B, PEFT's A, PEFT's B)`` as each side's residual was computed from them (fp32
    for OLoRA, whose factors are cast only afterwards; W's dtype for LoRA-GA)."""
    eps32 = 2.0**-23
    cast_ulp = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}[weight.dtype]
    a, b = (factors[0].float(), factors[1].float()) if factors else (ours.A.float(), ours.B.float())
    operands = weight.float().abs() + ours.scaling * (b.abs() @ a.abs())
    finfo = torch.finfo(weight.dtype)
    subnormal = finfo.smallest_normal * finfo.eps if weight.dtype != torch.float32 else 0.0
    bound = 4 * eps32 * operands + cast_ulp * theirs.float().abs() + subnormal + 1e-30
    if factors is not None:
        pa, pb = factors[2].float(), factors[3].float()
        bound += ours.scaling * (b.abs() @ (a - pa).abs() + (b - pb).abs() @ a.abs())
    diff = (ours.residual.float() - theirs.float()).abs()
    assert bool((diff <= bound).all()), f"max excess {float((diff - bound).max()):.3g}"


def _cases(ranks=RANKS):
    for dtype in DTYPES:
        for rank in ranks:
            for shape_name, shape in SHAPES.items():
                for rslora in (False, True):
                    yield pytest.param(dtype, rank, shape, rslora, id=f"{dtype}-r{rank}-{shape_name}-rslora{rslora:d}")


@pytest.mark.parametrize("dtype,rank,shape,rslora", list(_cases()))
def test_olora_equals_peft(dtype, rank, shape, rslora):
    weight = _weight(shape, dtype)
    alpha = 16.0
    layer = _peft(OneLinear(weight), r=rank, lora_alpha=alpha, use_rslora=rslora, init_lora_weights="olora")
    peft_a, peft_b = _factors(layer, dtype)
    scaling = _scaling(rank, alpha, rslora)
    full = loram_ref.initialize("olora", weight, rank, scaling, algorithm="full")
    assert torch.equal(full.A, peft_a) and torch.equal(full.B, peft_b)  # the same QR: bit for bit
    _residual_close(full, layer.base_layer.weight.detach(), weight)
    fast = loram_ref.initialize("olora", weight, rank, scaling)  # QR of the first r columns
    tol = {torch.float32: 2e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(fast.B.float(), peft_b.float(), rtol=0, atol=tol)
    torch.testing.assert_close(fast.A.float(), peft_a.float(), rtol=0, atol=tol * float(weight.float().abs().max()) * 4)
    fast32 = loram_ref.initialize("olora", weight.float(), rank, scaling)  # the fp32 factors the residual came from
    _residual_close(fast, layer.base_layer.weight.detach(), weight,
                    (fast32.A, fast32.B, layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()))


def test_olora_fold_scaling_removes_the_projection_whatever_s():
    weight = _weight((40, 24), torch.float32, seed=3)
    init = loram_ref.initialize("olora", weight, 5, 3.0, fold_scaling=True)
    q = torch.linalg.qr(weight[:, :5].double()).Q
    torch.testing.assert_close(init.delta(torch.float64), q @ q.mT @ weight.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,rank,shape,rslora", list(_cases((2, 8, 64))))
def test_orthogonal_equals_peft_bit_for_bit(monkeypatch, dtype, rank, shape, rslora):
    seen = _captured(monkeypatch, "orthogonal_init")
    weight = _weight(shape, dtype)
    layer = _peft(OneLinear(weight), r=rank, lora_alpha=16, use_rslora=rslora, init_lora_weights="orthogonal")
    peft_a, peft_b = _factors(layer, dtype)
    gen = torch.Generator()
    gen.set_state(seen["rng"])
    ours = loram_ref.initialize("orthogonal", weight, rank, _scaling(rank, 16, rslora), generator=gen)
    assert torch.equal(ours.A, peft_a) and torch.equal(ours.B, peft_b)
    assert torch.equal(layer.base_layer.weight, weight)  # W unchanged


@pytest.mark.parametrize("rank", [1, 7])
def test_orthogonal_odd_rank_is_refused_as_peft_does_unless_asked(rank):
    weight = _weight((24, 16), torch.float32)
    with pytest.raises(ValueError, match="rank to be even"):
        get_peft_model(OneLinear(weight), LoraConfig(r=rank, target_modules=["lin"], init_lora_weights="orthogonal"))
    with pytest.raises(ValueError, match="even rank.*allow_odd_rank=True"):
        loram_ref.initialize("orthogonal", weight, rank)
    init = loram_ref.initialize("orthogonal", weight, rank, allow_odd_rank=True)
    assert float(init.product(torch.float64).norm()) <= 1e-6 * float(init.A.norm() * init.B.norm())
    assert int(torch.linalg.matrix_rank(init.A.double(), rtol=1e-5)) == (rank + 1) // 2  # ⌈r/2⌉; B: ⌊r/2⌋


@pytest.mark.parametrize("dtype,rank,shape,rslora", list(_cases()))
def test_mica_equals_peft_bit_for_bit(dtype, rank, shape, rslora):
    weight = _weight(shape, dtype)
    model = get_peft_model(OneLinear(weight), LoraConfig(r=rank, lora_alpha=16, use_rslora=rslora, target_modules=["lin"],
                                                    init_lora_weights="mica"))
    layer = model.base_model.model.lin
    peft_a, peft_b = _factors(layer, dtype)
    ours = loram_ref.initialize("mica", weight, rank, _scaling(rank, 16, rslora))
    assert torch.equal(ours.B, peft_b) and torch.equal(ours.A, peft_a) and not bool(ours.A.any())
    assert torch.equal(layer.base_layer.weight, weight)
    # only A trains, as the registry says (PEFT freezes B)
    trainable = {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}  # ...lora_A.default.weight
    assert trainable == {"lora_A"} and loram_ref.get_initializer("mica").trains == ("A",)


def _gradient(shape, seed=5):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    low = torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g)
    return (torch.randn(m, n, generator=g) * 0.1 + low) * 1e-3


@pytest.mark.parametrize("direction", ["ArB2r", "ArBr", "A2rBr", "random"])
@pytest.mark.parametrize("scale", ["stable", "weight_svd", "gd_scale", "unit"])
def test_lora_ga_equals_peft_on_its_gradient(monkeypatch, direction, scale):
    from peft import LoraGAConfig

    seen = _captured(monkeypatch, "lora_ga_init")
    shape, rank, dtype = (96, 64), 7, torch.float32
    weight, grad = _weight(shape, dtype), _gradient(shape)
    model = OneLinear(weight)
    model.lin._peft_loraga_grad = grad.clone()  # what preprocess_loraga attaches (its pass: the next test)
    layer = _peft(model, r=rank, lora_alpha=16, init_lora_weights="lora_ga",
                  lora_ga_config=LoraGAConfig(direction=direction, scale=scale))
    peft_a, peft_b = _factors(layer, dtype)
    gen = torch.Generator()
    gen.set_state(seen["rng"])
    ours = loram_ref.initialize("lora_ga", weight, rank, 16 / rank, stats=loram_ref.GradientStats(grad=grad),
                                direction=direction, scale=scale, generator=gen)
    torch.testing.assert_close(ours.A, peft_a, rtol=1e-4, atol=1e-4 * float(peft_a.abs().max()))
    torch.testing.assert_close(ours.B, peft_b, rtol=1e-4, atol=1e-4 * float(peft_b.abs().max()))
    _residual_close(ours, layer.base_layer.weight.detach(), weight, (ours.A, ours.B, peft_a, peft_b))


@pytest.mark.parametrize("dtype,rank,shape,rslora", list(_cases()))
def test_lora_ga_dtype_flow_equals_peft(monkeypatch, dtype, rank, shape, rslora):
    from peft import LoraGAConfig

    seen = _captured(monkeypatch, "lora_ga_init")
    weight, grad = _weight(shape, dtype), _gradient(shape)
    model = OneLinear(weight)
    model.lin._peft_loraga_grad = grad.clone()
    layer = _peft(model, r=rank, lora_alpha=16, use_rslora=rslora, init_lora_weights="lora_ga",
                  lora_ga_config=LoraGAConfig())
    peft_a, peft_b = _factors(layer, dtype)
    gen = torch.Generator()
    gen.set_state(seen["rng"])
    ours = loram_ref.initialize("lora_ga", weight, rank, _scaling(rank, 16, rslora),
                                stats=loram_ref.GradientStats(grad=grad), generator=gen)
    ulp = {torch.float32: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(ours.A.float(), peft_a.float(), rtol=0, atol=2 * ulp * float(peft_a.float().abs().max()))
    torch.testing.assert_close(ours.B.float(), peft_b.float(), rtol=0, atol=2 * ulp * float(peft_b.float().abs().max()))
    _residual_close(ours, layer.base_layer.weight.detach(), weight, (ours.A, ours.B, peft_a, peft_b))


class _Tiny(nn.Module):
    """Two targeted layers fed planted-covariance inputs (``forward(x)``, x: batch x T x n)."""

    def __init__(self, n=48, m=40, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(n, m, bias=False)
        self.out = nn.Linear(m, n, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(m, n, generator=g) / n**0.5)
            self.out.weight.copy_(torch.randn(n, m, generator=g) / m**0.5)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


def _inputs(samples=24, tokens=32, n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    # six well-separated principal components over a flat tail
    scale = torch.cat([torch.tensor([4.0, 3.2, 2.6, 2.1, 1.7, 1.4]), torch.full((n - 6,), 0.3)])
    basis = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    return (torch.randn(samples, tokens, n, generator=g) * scale) @ basis.mT + 0.05


def _loss(model, x):
    return model(x).square().mean()


def test_our_gradient_pass_is_peft_loraga_gradient():
    """Our shared pass's mean gradient equals what ``preprocess_loraga`` attaches."""
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    x = _inputs()
    model = _Tiny()
    config = LoraConfig(r=4, target_modules=["lin"], init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():
        for i in range(0, len(x), 4):
            _loss(model, x[i:i + 4]).backward()

    preprocess_loraga(model, config, train_step)
    theirs = model.lin._peft_loraga_grad
    fresh = _Tiny()
    moments = collect_moments(fresh, x, {"lin": fresh.lin}, {"grad"}, batch_size=4, loss_fn=_loss)[len(x)]["lin"]
    # PEFT: the mean over the 6 backward calls of batch-mean gradients; ours: Σ_j ∇L_j / N
    torch.testing.assert_close(moments.grad_sum / len(x), theirs, rtol=1e-5, atol=1e-8)


def test_corda_equals_peft_from_its_covariance_and_from_our_pass():
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    x = _inputs()
    rank = 6
    for mode in ("ipm", "kpm"):
        model = _Tiny()
        weight = model.lin.weight.detach().clone()
        config = LoraConfig(r=rank, lora_alpha=12, target_modules=["lin"], init_lora_weights="corda",
                            corda_config=CordaConfig(corda_method=mode, prune_temporary_fields=False))
        preprocess_corda(model, config, run_model=lambda: [model(x[i:i + 1]) for i in range(len(x))])
        covariance = model.lin.covariance_matrix.clone()
        layer = get_peft_model(model, config).base_model.model.lin
        peft_a, peft_b = _factors(layer, torch.float32)
        peft_res = layer.base_layer.weight.detach()

        fed = loram_ref.initialize("corda", weight, rank, 2.0, mode=mode,
                                   stats=loram_ref.InputCovarianceStats(covariance=covariance))
        assert torch.equal(fed.A, peft_a) and torch.equal(fed.B, peft_b) and torch.equal(fed.residual, peft_res)

        fresh = _Tiny()
        sums = collect_moments(fresh, x, {"lin": fresh.lin}, {"input_peak"}, batch_size=4, loss_fn=_loss)[len(x)]["lin"]
        ours_cov = sums.input_peak_sq / sums.samples
        torch.testing.assert_close(ours_cov, covariance, rtol=1e-5, atol=1e-7)
        ours = loram_ref.initialize("corda", weight, rank, 2.0, mode=mode,
                                    stats=loram_ref.InputCovarianceStats(covariance=ours_cov))
        torch.testing.assert_close(ours.A, peft_a, rtol=1e-3, atol=1e-3 * float(peft_a.abs().max()))
        torch.testing.assert_close(ours.B, peft_b, rtol=1e-3, atol=1e-3 * float(peft_b.abs().max()))
        _residual_close(ours, peft_res, weight, (ours.A, ours.B, peft_a, peft_b))


def test_eva_equals_peft_within_its_convergence_tolerance():
    from peft import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    x = _inputs(samples=48)
    rank = 6
    model = _Tiny()
    config = LoraConfig(r=rank, target_modules=["lin"], init_lora_weights="eva", eva_config=EvaConfig(rho=1.0, tau=0.99))
    peft_model = get_peft_model(model, config)
    batches = [x[i:i + 4] for i in range(0, len(x), 4)]
    initialize_lora_eva_weights(peft_model, dataloader=batches, forward_fn=lambda m, b: m(b),
                                prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False)
    layer = peft_model.base_model.model.lin
    peft_a, peft_b = _factors(layer, torch.float32)
    assert not bool(peft_b.any())

    fresh = _Tiny()
    sums = collect_moments(fresh, x, {"lin": fresh.lin}, {"input"}, batch_size=4, loss_fn=_loss)[len(x)]["lin"]
    stats = loram_ref.InputMomentsStats(second_moment=sums.input_sq / sums.tokens, mean=sums.input_sum / sums.tokens,
                                        tokens=sums.tokens)
    ours = loram_ref.initialize("eva", fresh.lin.weight, rank, stats=stats)
    cos = (ours.A * peft_a).sum(1) / (ours.A.norm(dim=1) * peft_a.norm(dim=1))
    assert bool((cos >= 0.99).all()), cos  # same direction and the same sign
    assert not bool(ours.B.any())


def test_one_pass_serves_every_kind_as_if_alone():
    """collect_kinds: each kind's statistics from the shared pass equal those of its own pass."""
    from loram_ref.statistics import CollectContext, collect_kinds

    x = _inputs(samples=12)
    ctx = CollectContext(batch_size=4, lr=1e-3, num_train=100, loss_fn=_loss)
    kinds = {name: loram_ref.get_initializer(name).statistics for name in ("lora_sb", "lora_da", "lora_ga", "corda",
                                                                           "eva")}
    counts = {"lora_sb": 4, "lora_da": 12, "gradient": 8, "input_covariance": 12, "input_moments": 6}
    model = _Tiny()
    shared = collect_kinds(model, {k.name: (k, x[:counts[k.name]]) for k in kinds.values()}, ["lin"], ctx)
    for kind in kinds.values():
        alone = kind.collect(_Tiny(), x[:counts[kind.name]], ["lin"], ctx)[0]
        for layer, stats in shared[kind.name][0].items():
            for field, value in stats.__dict__.items():
                if isinstance(value, torch.Tensor):
                    # the shared pass splits its batches at every kind's count: the same sums in
                    # another order
                    torch.testing.assert_close(value, getattr(alone[layer], field), rtol=1e-5,
                                               atol=1e-6 * float(value.abs().max()))
                else:
                    assert value == getattr(alone[layer], field)


@pytest.mark.parametrize("dtype,rank,shape,rslora", list(_cases()))
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_fed_peft_covariance_is_peft_bit_for_bit_across_dtypes(dtype, rank, shape, rslora, mode):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import collect_eigens_for_layer, crop_corda_eigens

    weight = _weight(shape, dtype)
    n = shape[1]
    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(4)) * torch.logspace(0, -1, n)
    covariance = x.mT @ x / x.shape[0]
    model = OneLinear(weight)
    model.lin.covariance_matrix = covariance.clone()
    config = LoraConfig(r=rank, lora_alpha=16, use_rslora=rslora, target_modules=["lin"], init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=mode))
    model.lin.eigens = collect_eigens_for_layer(model.lin, config)
    model.lin.corda_method, model.lin.rank = mode, rank
    crop_corda_eigens(model, config)
    layer = get_peft_model(model, config).base_model.model.lin
    peft_a, peft_b = _factors(layer, dtype)
    ours = loram_ref.initialize("corda", weight, rank, _scaling(rank, 16, rslora), mode=mode,
                                stats=loram_ref.InputCovarianceStats(covariance=covariance))
    assert torch.equal(ours.A, peft_a) and torch.equal(ours.B, peft_b)
    assert torch.equal(ours.residual, layer.base_layer.weight.detach())
