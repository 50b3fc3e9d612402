"""Input checks shared by every initializer. Each error names the offending parameter."""

from __future__ import annotations

import math
import numbers

import torch

#: Elements per block when a pass over ``W`` is chunked, so that temporaries (a bool
#: mask, an fp32 up-cast of a bf16 block) stay at a fixed 16 MiB-ish size instead of
#: growing with ``W``.
CHUNK_ELEMENTS = 1 << 22


def check_weight(weight: object, name: str = "weight") -> torch.Tensor:
    """Require a 2-D floating-point tensor (fp32, fp16, bf16 or fp64)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (d_out x d_in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(weight.shape)}")
    return weight


def row_blocks(weight: torch.Tensor, elements: int = CHUNK_ELEMENTS):
    """Yield row blocks of ``weight`` holding about ``elements`` entries each (views)."""
    rows = max(1, elements // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        yield weight[start : start + rows]


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of a 2-D ``tensor`` is finite.

    One fast read pass: a native sum is finite unless an entry is non-finite (or the sum
    itself overflows); only then does the exact ``isfinite`` scan run, in blocks, so the
    bool mask never exceeds one block. (On CPU ``isfinite`` costs several times a sum,
    ~30x in bf16: the common, finite case does not pay for it.)
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return all(bool(torch.isfinite(block).all()) for block in row_blocks(tensor))


def check_finite(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise if ``weight`` holds NaN or Inf (:func:`is_finite`)."""
    if not is_finite(weight):
        raise ValueError(f"{name} contains NaN or Inf values")


def squared_norm(weight: torch.Tensor, name: str = "weight", block_elements: int = 1 << 20) -> float:
    """``‖W‖_F²`` accumulated in float64 over block norms; no full-size up-cast copy.

    Each block's norm is one reduction kernel reading the block once (accumulating in
    fp32, or fp64 for a float64 ``W``), and the squares add up in float64 on ``W``'s
    device, read once at the end (one host sync):

    * float32 / float64: the native norm, in the weight's precision;
    * bfloat16: the native bf16 norm (fp32 accumulator inside, the block's norm rounded
      to bf16: about 2⁻⁸ relative per block, averaging out over blocks; ~1e-5 relative
      on ‖W‖² at 28672 x 8192). Asking for an fp32 result instead takes a slow
      conversion path on CPU (4-5x the time of the read, measured here);
    * float16: an fp32 result (its range: a block norm above 65504 would overflow fp16).

    Doubles as the finiteness check of the methods that need the norm anyway (LoRAM):
    a NaN/Inf anywhere in ``W`` makes the sum non-finite.
    """
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    out_dtype = torch.float32 if weight.dtype == torch.float16 else None
    for block in row_blocks(weight, block_elements):
        norm = torch.linalg.vector_norm(block, dtype=out_dtype) if out_dtype else torch.linalg.vector_norm(block)
        total += norm.double().square()
    value = float(total)
    if not math.isfinite(value):
        raise ValueError(f"{name} contains NaN or Inf values (its squared Frobenius norm is {value})")
    return value


def check_rank(rank: object, weight: torch.Tensor, minimum: int = 1, name: str = "rank") -> int:
    """Require an integer ``minimum <= rank <= min(m, n)``."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(rank).__name__}")
    limit = min(weight.shape)
    if rank < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {rank}")
    if rank > limit:
        raise ValueError(f"{name}={rank} exceeds min(d_out, d_in)={limit} of weight shape {tuple(weight.shape)}")
    return int(rank)


def check_scaling(scaling: object, name: str = "scaling") -> float:
    """Require a finite, positive scaling ``s``."""
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(scaling).__name__}")
    scaling = float(scaling)
    if not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {scaling}")
    return float(scaling)


def check_inputs(weight: object, rank: object, scaling: object, *, check_input: bool, min_rank: int = 1) -> float:
    """The checks every initializer starts with; returns the scaling as a float.

    ``check_input`` adds the NaN/Inf pass over ``W`` (off where a method's own pass over
    ``W`` already catches them, or where a benchmark times the algorithm alone).
    """
    check_weight(weight)
    check_rank(rank, weight, minimum=min_rank)
    scaling = check_scaling(scaling)
    if check_input:
        check_finite(weight)
    return scaling


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_shape(tensor: object, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """Require a finite floating tensor of exactly ``shape`` (layer statistics)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    check_finite(tensor if tensor.dim() == 2 else tensor.reshape(1, -1), name)
    return tensor


def resolve_generator(generator: torch.Generator | None, device: torch.device, seed: int) -> torch.Generator:
    """The generator to draw from: the caller's, or a fresh one seeded with ``seed``.

    Never the global RNG (issue #2): results are reproducible and nothing else's
    random stream is disturbed.
    """
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, but the weight is on {device}")
        return generator
    return torch.Generator(device=device).manual_seed(seed)
