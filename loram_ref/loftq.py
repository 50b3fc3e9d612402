"""LoftQ: LoRA-fine-tuning-aware quantization (docs/initializers.md §6; Li et al. 2023, arXiv 2310.08659; PEFT loftq_init).

PEFT's ``loftq_init`` quantizes with bitsandbytes on a CUDA or XPU device; the quantizers here
are the same formats in plain torch, so the method runs (and is measured) on any device:

* **NF4** (Dettmers et al. 2023, QLoRA §3): the flattened weight in blocks of 64, each
  divided by its absolute maximum (kept in fp32) and rounded to the nearest of the 16 NF4
  values (:data:`NF4`).
* **INT8**, vector-wise: each row divided by its absolute maximum and rounded to
  ``round(127·x/absmax)``.
"""

from __future__ import annotations

import torch

from .registry import FULL_SVD, Invariant, register
from .result import LoraInit
from .validation import check_inputs, check_positive_int
from .work import Work, svd_flops

#: The 16 NormalFloat-4 code values (QLoRA, Appendix E), ascending.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
BLOCK = 64
BITS = (4, 8)


def nf4_roundtrip(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``dequant(quant(x))`` in NF4 with blocks of ``block`` elements of the flattened ``x`` (fp32)."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    padded = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    absmax = padded.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    code = torch.tensor(NF4, dtype=x.dtype, device=x.device)
    mids = (code[1:] + code[:-1]) / 2  # nearest code value: thresholds at the midpoints
    idx = torch.bucketize(padded / scale, mids)
    return (code[idx] * scale).view(-1)[: flat.numel()].view_as(x)


def int8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """``dequant(quant(x))`` in vector-wise INT8: per row ``round(127·x/absmax)·absmax/127``."""
    absmax = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.round(x * (127.0 / scale)).clamp_(-127, 127).mul_(scale / 127.0)


def loftq_work(iterations: int):
    """``iterations`` full SVDs (≈ 4·m·n·k + 8·k³ each) and quantization round trips of W."""

    def model(m: int, n: int, r: int, itemsize: int) -> Work:
        return Work(read_bytes=m * n * itemsize + iterations * 3 * m * n * 4, rw_bytes=iterations * 4 * m * n * 4,
                    flops=iterations * (svd_flops(m, n) + 2.0 * m * n * r), gemm="square")

    return model


@register(
    "loftq",
    harness=("check_input",),
    work=loftq_work(1),
    invariant=Invariant.QUANTIZED,
    cost=FULL_SVD,
    peft_name='"loftq" (needs bitsandbytes on CUDA/XPU)',
    decomposition="quantization + full SVD of the quantization error, per iteration",
    layer_task_excluded=("the layer task's loss is factored for an exact base weight; a quantized base adds a "
                         "full-rank error it does not model"),
    label="LoftQ (NF4)",
    paper="Li et al. 2023, LoftQ (arXiv 2310.08659); PEFT loftq_init",
    summary="T times: Q = quant(W − B·A), B, A = rank-r SVD factors of W − dequant(Q); W_res = dequant(Q)",
)
def loftq(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    bits: int = 4,
    iterations: int = 1,
    fold_scaling: bool = True,
    check_input: bool = True,
) -> LoraInit:
    """LoftQ (PEFT ``init_lora_weights="loftq"``), docs/initializers.md §6.

    With ``res = W`` (fp32): for each of ``iterations``: ``Q = dequant(quant(res))``,
    ``E = W − Q``, ``U, S, Vᵀ = svd(E)``, ``B = U_r·√S_r``, ``A = √S_r·V_rᵀ``, then
    ``res = W − B·A`` (skipped after the last). The base becomes ``W_res = Q`` (in W's dtype):
    invariant (Q), ``W_res + s·B·A`` approximates W better than the quantized base alone.

    ``fold_scaling=True`` (default) divides A by s so that ``s·B·A`` is the SVD's rank-r
    approximation of the quantization error for every s. PEFT does not fold s
    (``fold_scaling=False``), which is consistent only at s = 1; at s = 1 the two are the same.
    ``bits``: 4 (NF4, blocks of 64) or 8 (vector-wise INT8), the module docstring's formats.
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    if bits not in BITS:
        raise ValueError(f"bits must be 4 (NF4) or 8 (INT8), got {bits!r}")
    iterations = check_positive_int(iterations, "iterations")
    if rank > min(weight.shape):
        raise ValueError(f"loftq requires rank <= min(d_out, d_in) = {min(weight.shape)}, got {rank}")
    w = weight.double() if weight.dtype == torch.float64 else weight.to(torch.float32)
    roundtrip = nf4_roundtrip if bits == 4 else int8_roundtrip
    res = w
    for i in range(iterations):
        quantized = roundtrip(res)
        u, s, vh = torch.linalg.svd(w - quantized, full_matrices=False)
        root = s[:rank].sqrt()
        b = u[:, :rank] * root[None, :]
        a = root[:, None] * vh[:rank]
        del u, s, vh
        if i + 1 < iterations:
            res = w - b @ a
    error_before = float((w - quantized).norm())
    error_after = float((w - quantized - b @ a).norm())
    if fold_scaling:
        a = a / scaling
    return LoraInit(method="loftq", A=a.to(weight.dtype).contiguous(), B=b.to(weight.dtype).contiguous(),
                    scaling=scaling, residual=quantized.to(weight.dtype),
                    info={"bits": bits, "iterations": iterations, "fold_scaling": fold_scaling,
                          "quant_error_rel": error_before / max(float(w.norm()), 1e-300),
                          "lora_error_rel": error_after / max(float(w.norm()), 1e-300)})
