"""Products streamed over row blocks (``loram_ref.stream.RowStream``) and what is built on them:
the randomized SVD, PiSSA's residual, LoRA-SB on any update dtype, and ``squared_norm``.

What must hold: the products are those of the exactly up-cast matrix, to fp32 rounding, for
every dtype, layout, block size and worker count; no full-size fp32 copy of W is ever
allocated (checked op by op with a dispatch mode); torch's thread count is restored whatever
happens in a worker; a bf16 weight's randomized SVD equals the one of its fp32 up-cast.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import loram_ref
from loram_ref.linalg import principal_angles, randomized_svd
from loram_ref.stream import CPU_BLOCK_ELEMENTS, RowStream, streamed_products
from loram_ref.residual import finish, streamed_residual, work_copy
from loram_ref.statistics.types import LoraSBStats
from loram_ref.validation import squared_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


@pytest.fixture
def two_threads():
    """Two intra-op threads, so the stream shares its blocks over two workers; restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(300, 96), (96, 300), (301, 97)], ids=["tall", "wide", "odd"])
@pytest.mark.parametrize("block_elements", [1000, 1 << 20], ids=["many-blocks", "one-block"])
def test_streamed_products_are_the_up_cast_matrix_products(dtype, shape, block_elements, two_threads):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(*shape, generator=gen).to(dtype)
    x = torch.randn(shape[1], 5, generator=gen, dtype=torch.float64)
    y = torch.randn(shape[0], 5, generator=gen, dtype=torch.float64)
    stream = RowStream(a, block_elements)
    cd = stream.dtype
    assert cd == (torch.float64 if dtype == torch.float64 else torch.float32)
    exact = a.double()
    tol = 1e-12 if cd == torch.float64 else 1e-6
    assert _rel(stream.times(x.to(cd)), exact @ x.to(cd).double()) < tol
    assert _rel(stream.times_transposed(y.to(cd)), exact.mT @ y.to(cd).double()) < tol
    if block_elements == 1000:
        assert stream.rows * shape[1] <= 1000 and stream.workers == 2  # many blocks, two workers


def test_a_transposed_view_streams_the_rows_of_the_matrix_it_views():
    gen = torch.Generator().manual_seed(1)
    stored = torch.randn(200, 64, generator=gen)
    a = stored.mT  # 64 x 200, not contiguous
    times_a, times_at, _ = streamed_products(a, block_elements=640)
    x, y = torch.randn(200, 3, generator=gen), torch.randn(64, 3, generator=gen)
    torch.testing.assert_close(times_a(x), a @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(times_at(y), a.mT @ y, rtol=1e-5, atol=1e-5)


def test_the_thread_count_is_restored_and_a_workers_error_reaches_the_caller(two_threads):
    stream = RowStream(torch.randn(64, 32), block_elements=64)
    assert stream.workers == 2
    seen: list[int] = []

    def body(k, share):
        seen.append(torch.get_num_threads())  # each worker runs single-threaded kernels
        for _ in share:
            pass
        if k == 1:
            raise RuntimeError("worker 1 failed")

    with pytest.raises(RuntimeError, match="worker 1 failed"):
        stream.run(body)
    assert seen == [1, 1] and torch.get_num_threads() == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("niter", [0, 4])
def test_a_low_precision_weights_randomized_svd_is_the_one_of_its_fp32_up_cast(dtype, niter, two_threads):
    w = torch.randn(600, 200, generator=torch.Generator().manual_seed(2)).to(dtype)
    streamed = randomized_svd(w, 8, niter, torch.Generator().manual_seed(5), block_elements=4000)
    whole = randomized_svd(w.float(), 8, niter, torch.Generator().manual_seed(5), block_elements=1 << 30)
    for ours, ref in zip(streamed, whole):
        assert ours.dtype == torch.float32
    assert _rel(streamed[1], whole[1]) < 1e-5
    # the same subspaces (a flat spectrum: rounding is amplified by the small gaps, still ~1e-4 rad)
    assert float(principal_angles(streamed[0], whole[0]).max()) < 1e-3
    assert float(principal_angles(streamed[2], whole[2]).max()) < 1e-3


def test_the_randomized_svd_draws_as_torch_svd_lowrank_does():
    """The same test matrix, from a generator in the global RNG's state: the same subspace as
    PEFT's ``torch.svd_lowrank`` call (its QR and GEMM calls differ only in rounding)."""
    w = torch.randn(400, 150, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    u_ref, s_ref, v_ref = torch.svd_lowrank(w, q=6, niter=2)
    u, s, v = randomized_svd(w, 6, 2, torch.Generator().manual_seed(11), block_elements=1500)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    assert float(principal_angles(u, u_ref).max()) < 1e-4 and float(principal_angles(v, v_ref).max()) < 1e-4


class _LargestAllocation(TorchDispatchMode):
    """The largest storage, in bytes, that any op returns, other than the inputs' own (views
    of W and of the update, and W itself where the residual is written in place)."""

    def __init__(self, *inputs: torch.Tensor):
        super().__init__()
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("name", ["pissa_rsvd", "lora_sb"])
def test_the_randomized_svd_methods_never_allocate_a_full_size_fp32_copy(name):
    """Op by op (one thread, so every op runs under the mode): the largest storage allocated
    is one fp32 block plus O((m+n)·q), where an fp32 copy of W (as PEFT makes) would be
    4·m·n bytes and a bf16 one 2·m·n."""
    m, n, r = 4096, 2048, 8
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    update = torch.sign(torch.randn(m, n, generator=gen)).to(torch.bfloat16)
    kwargs = {"inplace": True, "generator": torch.Generator().manual_seed(0)} if name == "pissa_rsvd" else {
        "stats": LoraSBStats(update=update)}
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _LargestAllocation(w, update) as mode:
            init = loram_ref.initialize(name, w, r, check_input=False, **kwargs)
    finally:
        torch.set_num_threads(saved)
    assert init.A.shape == (r, n)
    assert mode.largest <= 4 * (CPU_BLOCK_ELEMENTS + 2 * (m + n) * r), mode.largest
    assert mode.largest < 2 * m * n  # below even a bf16 copy of W


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block_elements", [None, 600, 1 << 14], ids=["default", "one-row", "rows"])
def test_the_streamed_residual_is_the_work_copy_arithmetic(dtype, block_elements, two_threads):
    """Per entry the same fp32 arithmetic and one rounding: equal to the work-copy path up to
    one rounding of W's dtype (a one-row block's GEMM may sum its r products in another order)."""
    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(500, 600, generator=gen) * 0.05).to(dtype)
    b, a = torch.randn(500, 8, generator=gen) * 0.1, torch.randn(8, 600, generator=gen) * 0.1
    work = work_copy(w, False)
    work.addmm_(b, a, alpha=-0.5)
    expected = finish(work, w, False, "test")
    got = streamed_residual(w, b, a, 0.5, False, "test", block_elements=block_elements)
    assert got.dtype == dtype and got.data_ptr() != w.data_ptr()
    # one rounding at the larger of the two (a flip across a power of two included)
    ulp = torch.finfo(dtype).eps * torch.maximum(expected.float().abs(), got.float().abs()) + torch.finfo(dtype).tiny
    assert bool(((got.float() - expected.float()).abs() <= ulp).all())
    in_place = w.clone()
    assert streamed_residual(in_place, b, a, 0.5, True, "test", block_elements=block_elements) is in_place
    assert torch.equal(in_place, got)


def test_the_streamed_residual_refuses_an_fp16_overflow():
    w = torch.full((64, 32), 60000.0, dtype=torch.float16)
    b, a = torch.full((64, 1), -100.0), torch.full((1, 32), 100.0)
    with pytest.raises(ValueError, match="overflows torch.float16"):
        streamed_residual(w, b, a, 1.0, False, "pissa_rsvd", block_elements=256)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_squared_norm_is_accurate(dtype):
    w = torch.randn(3000, 700, generator=torch.Generator().manual_seed(7)).to(dtype)
    exact = float(w.double().square().sum())
    tol = {torch.bfloat16: 1e-4, torch.float16: 1e-6, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    assert abs(squared_norm(w, block_elements=50_000) - exact) / exact < tol


def test_squared_norm_of_bf16_rows_that_all_round_alike_is_within_its_stated_worst_case():
    w = torch.ones(100, 128, dtype=torch.bfloat16)  # every row norm √128, rounded to bf16 the same way
    assert abs(squared_norm(w) - 100 * 128) / (100 * 128) <= 2**-8


def test_squared_norm_of_fp16_rows_beyond_its_range_does_not_overflow():
    w = torch.full((4, 1024), 60000.0, dtype=torch.float16)  # each row norm 1.9e6 > 65504
    assert squared_norm(w) == pytest.approx(4 * 1024 * 60000.0**2, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_squared_norm_names_a_non_finite_weight(dtype, bad):
    w = torch.randn(50, 40).to(dtype)
    w[17, 3] = bad
    with pytest.raises(ValueError, match="stats.update contains NaN or Inf"):
        squared_norm(w, "stats.update")


def test_lora_sb_takes_an_update_in_any_float_dtype_and_names_a_non_finite_one():
    """A bf16 update (±1, exact) is decomposed in fp32 block by block, with no fp32 copy: the
    same factors as the fp32 update ±1e-3 up to its scale, where the top-r subspace is well
    separated (the sign of a rank-3 matrix at r = 3; on a flat sign spectrum 10 iterations do
    not converge and rounding alone moves the subspace)."""
    m, n, r = 256, 128, 3
    gen = torch.Generator().manual_seed(8)
    sign = torch.sign(torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen))
    fp32 = loram_ref.initialize("lora_sb", torch.zeros(m, n), r, stats=LoraSBStats(update=sign.mul(-1e-3)),
                                round_bf16=False)
    bf16 = loram_ref.initialize("lora_sb", torch.zeros(m, n), r, stats=LoraSBStats(update=sign.to(torch.bfloat16)),
                                round_bf16=False)
    # σ(−1e-3·S) = 1e-3·σ(S): R scales, the subspaces and the captured energy do not (its
    # ‖ΔW‖² from bf16 row norms: rows of equal norm all round alike, 2⁻⁸ at worst)
    torch.testing.assert_close(bf16.R * 1e-3, fp32.R, rtol=1e-5, atol=0)
    assert float(principal_angles(bf16.B.double(), fp32.B.double()).max()) < 1e-4
    assert fp32.info["captured_energy"] == pytest.approx(bf16.info["captured_energy"], rel=2**-8)
    bad = sign.clone()
    bad[3, 4] = math.nan
    with pytest.raises(ValueError, match="stats.update contains NaN or Inf"):
        loram_ref.initialize("lora_sb", torch.zeros(m, n), r, stats=LoraSBStats(update=bad))


def test_lora_sbs_captured_energy_is_its_sigmas_share_of_the_update():
    m, n, r = 200, 120, 6
    update = torch.randn(m, n, generator=torch.Generator().manual_seed(9)) * 1e-3
    init = loram_ref.initialize("lora_sb", torch.zeros(m, n), r, stats=LoraSBStats(update=update), round_bf16=False)
    sigma = torch.diagonal(init.R.double()) * init.scaling
    assert init.info["captured_energy"] == pytest.approx(float(sigma.square().sum() / update.double().square().sum()),
                                                         rel=1e-5)
