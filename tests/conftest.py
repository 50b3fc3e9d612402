"""Shared helpers: every initializer called with the statistics it needs."""

from __future__ import annotations

import pytest
import torch

import loram_ref

#: The loss benchmark's test text: enough blocks of 16-32 tokens for a tiny model.
TEXT = " ".join(f"line {i}: the quick brown fox {i % 7} jumps over {i % 11} lazy dogs." for i in range(400))


@pytest.fixture()
def corpus_file(tmp_path):
    """:data:`TEXT` as a local ``--data`` file."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path

SHAPES = {"tall": (96, 48), "wide": (40, 112), "square": (64, 64)}
DTYPES = [torch.float32, torch.bfloat16]

# Relative Frobenius tolerance of a reconstruction W_res + s·B·A ≈ W: about ten roundings
# of the dtype (the residual and factors are each rounded once in W's dtype).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def stats_for(name: str, m: int, n: int, seed: int = 123):
    kind = loram_ref.get_initializer(name).statistics
    return {"stats": kind.synthetic(m, n, torch.Generator().manual_seed(seed))} if kind.needed else {}


def run_init(name: str, weight: torch.Tensor, rank: int, scaling: float = 1.0, **kwargs) -> loram_ref.LoraInit:
    m, n = weight.shape
    return loram_ref.initialize(name, weight, rank, scaling, **stats_for(name, m, n), **kwargs)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def orthonormality_error(cols: torch.Tensor) -> float:
    """max |CᵀC - I| for a matrix with (supposedly) orthonormal columns."""
    c = cols.double()
    return float((c.mT @ c - torch.eye(c.shape[1], dtype=torch.float64)).abs().max())
