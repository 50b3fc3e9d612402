"""Input checks shared by every initializer. Each error names the offending parameter."""

from __future__ import annotations

import math
import numbers

import torch

from .stream import RowStream

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


def squared_norm(weight: torch.Tensor, name: str = "weight", block_elements: int = 1 << 22) -> float:
    """``‖W‖_F²`` as the float64 sum of W's squared row norms: one read of ``W``, no up-cast copy.

    * float32 / float64 / bfloat16: one native row-norm kernel over the whole matrix
      (accumulating in fp32, fp64 for float64). A bf16 row norm is rounded to bf16, 2⁻⁹
      relative per row: on random rows the errors average out (2e-6 relative on ‖W‖² at
      28672 x 8192, measured); the worst case, every row rounded the same way (rows of
      equal norm), is 2⁻⁸ relative on ‖W‖², which moves LoRAM's β = (Q‖W‖²/r)^¼ by 2⁻¹⁰,
      below the bf16 rounding of the factors it scales. The kernel reads at the machine's
      read bandwidth, where the whole-matrix bf16 norm takes twice as long and is off by
      7 % at that size (its reduction loses precision), and where an fp32 result takes a
      slow conversion path on CPU (20x the read).
    * float16: its norm kernel has no vectorized path on CPU (7x the read) and a row norm
      above 65504 would overflow, so row blocks of ``block_elements`` entries are up-cast
      into one fp32 buffer (:class:`loram_ref.stream.RowStream`) and normed there.

    Doubles as the finiteness check of the methods that need the norm anyway (LoRAM,
    LoRA-SB's captured energy): a NaN/Inf anywhere in ``W`` makes the sum non-finite.
    """
    if weight.dtype == torch.float16:
        total = torch.zeros((), dtype=torch.float64, device=weight.device)
        for _, block in RowStream(weight, block_elements).blocks():
            total += torch.linalg.vector_norm(block, dim=1).double().square().sum()
    else:
        total = torch.linalg.vector_norm(weight, dim=1).double().square().sum()
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


def check_shape(tensor: object, shape: tuple[int, ...], name: str, *, finite: bool = True) -> torch.Tensor:
    """Require a floating tensor of exactly ``shape`` (layer statistics), finite unless the
    caller's own pass over it catches NaN/Inf (``finite=False``, e.g. :func:`squared_norm`)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if finite:
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
