"""The frozen weights the benchmarks initialize, by spectrum (``--spectrum``).

* ``flat``: i.i.d. ``N(0, 1/n)`` entries (``nn.Linear``'s scale): a flat Marchenko-Pastur
  spectrum up to the edge ``1 + √(m/n)``, the hardest case for subspace iteration (the
  randomized SVDs' fidelity figures on it are worst cases) and one where no top-r solver can
  beat a full SVD.
* ``spiked``: the layer task's W (:class:`SpikedWeight`): the same bulk plus ``t`` singular
  values ``σ_i = edge·(1 + κ·i^{-p})`` above it, a decaying top as a trained weight's has
  (SmolLM2-135M's layers: σ_16/σ_1 = 0.21-0.89), with its top triplets known exactly.
"""

from __future__ import annotations

import hashlib
import math

import torch

from bench.core.identity import SPECTRA

__all__ = ["SPECTRA", "SpikedWeight", "gaussian_weight", "make_weight", "orthonormal", "stable_seed"]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text (blake2b): the same on every machine and run."""
    digest = hashlib.blake2b("::".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63 - 1)


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random ``rows x cols`` orthonormal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).float()


def gaussian_weight(m: int, n: int, seed: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``m x n`` i.i.d. ``N(0, 1/n)`` entries in ``dtype``, from a generator seeded with ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(m, n, dtype=dtype, device=device).normal_(0.0, n**-0.5, generator=gen)


class SpikedWeight:
    """``W = U_t·diag(σ)·V_tᵀ + P_U⊥·G·P_V⊥`` (the layer task's W, ``bench.layer.problem``):
    a bulk ``G`` of i.i.d. ``N(0, 1/n)`` entries projected off ``2t`` directions, and ``t``
    top singular values ``σ_i = edge·(1 + strength·i^{-decay})`` above the bulk's edge
    ``1 + √(m/n)``. The top triplets are exactly ``(U_t, σ, V_t)`` and ``(U_b, 0, V_b)`` are
    exact bottom singular pairs. Cheap to build: only :meth:`dense` makes the m x n matrix.
    """

    def __init__(self, m: int, n: int, top_directions: int = 32, top_strength: float = 4.0, top_decay: float = 1.0,
                 seed: int = 0):
        if not 1 <= top_directions <= min(m, n) // 2:
            raise ValueError(f"top_directions must be in 1..min(m, n)/2 = {min(m, n) // 2} for a {m}x{n} weight, "
                             f"got {top_directions}")
        self.m, self.n, self.seed = int(m), int(n), int(seed)
        t = int(top_directions)
        gen = torch.Generator().manual_seed(stable_seed("directions", m, n, seed))
        left = orthonormal(m, 2 * t, gen)
        right = orthonormal(n, 2 * t, gen)
        self.u_top, self.u_bottom = left[:, :t].contiguous(), left[:, t:].contiguous()
        self.v_top, self.v_bottom = right[:, :t].contiguous(), right[:, t:].contiguous()
        self.edge = 1.0 + math.sqrt(m / n)  # largest singular value of the bulk (N(0, 1/n) entries)
        i = torch.arange(1, t + 1, dtype=torch.float64)
        self.s_top = (self.edge * (1.0 + top_strength * i.pow(-top_decay))).float()
        bulk_sq = (m - 2 * t) * (n - 2 * t) / n  # E‖P⊥·G·P⊥‖_F²
        self.expected_norm = math.sqrt(float(self.s_top.double().square().sum()) + bulk_sq)  # E‖W‖_F

    def dense(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """``W`` (m x n): the bulk, projected off the known directions, plus the top.
        O(m·n·t) work, in fp32 then cast to ``dtype``."""
        gen = torch.Generator(device=device).manual_seed(stable_seed("bulk", self.m, self.n, self.seed))
        w = torch.empty(self.m, self.n, device=device, dtype=torch.float32).normal_(0.0, self.n**-0.5, generator=gen)
        u = torch.cat([self.u_top, self.u_bottom], 1).to(device)
        v = torch.cat([self.v_top, self.v_bottom], 1).to(device)
        w.addmm_(u, u.mT @ w, alpha=-1.0)  # (I − UUᵀ)·G
        w.addmm_(w @ v, v.mT, alpha=-1.0)  # ·(I − VVᵀ)
        w.addmm_(self.u_top.to(device) * self.s_top.to(device)[None, :], self.v_top.to(device).mT)
        return w if dtype == torch.float32 else w.to(dtype)


def make_weight(m: int, n: int, seed: int, spectrum: str = "flat", dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """An ``m x n`` weight of the named spectrum (:data:`SPECTRA`), from ``seed``."""
    if spectrum == "flat":
        return gaussian_weight(m, n, seed, dtype, device)
    if spectrum == "spiked":
        return SpikedWeight(m, n, top_directions=min(32, min(m, n) // 2), seed=seed).dense(dtype, device)
    raise ValueError(f"spectrum must be one of {', '.join(SPECTRA)}, got {spectrum!r}")
