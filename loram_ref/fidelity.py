"""Fidelity diagnostics of the approximate methods: how far each is from the exact
computation it stands for. Each is registered on its initializer (``fidelity=``) and run
by the harness after the timings, never inside a timed call.

* ``pissa_rsvd``: the largest principal angle (degrees) between the randomized SVD's
  top-r right singular subspace and the exact one, for niter 0, 2, 4 and 16 (the same
  seed), so a user can choose ``niter``;
* ``lora_sb``: the energy its factors capture, ``‖Bᵀ·ΔW·Aᵀ‖²_F / ‖ΔW‖²_F``, against the
  Eckart–Young optimum ``Σ_{i≤r} σ_i² / ‖ΔW‖²_F``;
* ``lora_da``: the largest principal angle between its subspace (LOBPCG) and the exact
  smallest-r eigenvectors of Ω (``solver="eigh"``), where n <= :data:`EIGH_MAX_N`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .linalg import principal_angles, randomized_svd
from .result import LoraInit

#: Niters at which pissa_rsvd's subspace is compared with the exact one.
NITERS = (0, 2, 4, 16)
#: Largest n for which LoRA-DA's exact eigendecomposition of Ω (n x n) is affordable.
EIGH_MAX_N = 4096


def _deg(u: torch.Tensor, v: torch.Tensor) -> float:
    return math.degrees(float(principal_angles(u, v).max()))


def _orthonormal_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x.double().mT).Q


def pissa_rsvd_fidelity(weight: torch.Tensor, rank: int, init: LoraInit, kwargs: dict[str, Any]) -> dict[str, float]:
    """Largest angle (°) to the exact top-r right singular subspace, per niter in :data:`NITERS`."""
    work = weight.double() if weight.dtype == torch.float64 else weight.float()
    exact = torch.linalg.svd(work, full_matrices=False).Vh[:rank].mT
    seed = int(kwargs.get("seed", 0))
    out = {}
    for niter in NITERS:
        gen = torch.Generator(device=weight.device).manual_seed(seed)
        _, _, v = randomized_svd(work, rank, niter, gen)
        out[f"angle_deg_niter{niter}"] = _deg(v, exact)
    out["angle_deg"] = _deg(_orthonormal_rows(init.A), exact)
    return out


def lora_sb_fidelity(weight: torch.Tensor, rank: int, init: LoraInit, kwargs: dict[str, Any]) -> dict[str, float]:
    """Captured energy of the factors against the Eckart–Young optimum of the update."""
    update = kwargs["stats"].update.double()
    total = float(update.square().sum())
    if total == 0.0:
        return {}
    b, a = init.B.double(), init.A.double()
    captured = float((b.mT @ update @ a.mT).square().sum()) / total
    optimum = float(torch.linalg.svdvals(update)[:rank].square().sum()) / total
    return {"captured_energy": captured, "optimal_energy": optimum, "energy_ratio": captured / optimum if optimum else 1.0}


def lora_da_fidelity(weight: torch.Tensor, rank: int, init: LoraInit, kwargs: dict[str, Any]) -> dict[str, float]:
    """Largest angle (°) between LOBPCG's subspace and the exact one (n <= :data:`EIGH_MAX_N`)."""
    from .lora_da import lora_da

    out = {"eig_residual": float(init.info.get("eig_residual", math.nan))}
    if weight.shape[1] > EIGH_MAX_N or init.info.get("eigensolver") == "eigh":
        return out
    exact = lora_da(weight, rank, init.scaling, **{**kwargs, "solver": "eigh"})
    out["angle_deg_to_eigh"] = _deg(_orthonormal_rows(init.A), _orthonormal_rows(exact.A))
    return out
