"""Fidelity diagnostics of the approximate methods: how far each is from the exact
computation it stands for. Each lives in its initializer's module, is registered on it
(``fidelity=``) and is run by the harness after the timings, never inside a timed call:

* ``pissa_rsvd``: the largest principal angle (degrees) between the randomized SVD's
  top-r right singular subspace and the exact one, for niter 0, 2, 4 and 16 (the same
  seed), so a user can choose ``niter``;
* ``lora_sb``: the energy its factors capture, ``‖Bᵀ·ΔW·Aᵀ‖²_F / ‖ΔW‖²_F``, against the
  Eckart–Young optimum ``Σ_{i≤r} σ_i² / ‖ΔW‖²_F``;
* ``lora_da``: the largest principal angle between its subspace (LOBPCG) and the exact
  smallest-r eigenvectors of Ω (``solver="eigh"``), where n <= 4096.

This module holds what they share.
"""

from __future__ import annotations

import math

import torch

from .linalg import principal_angles


def angle_deg(u: torch.Tensor, v: torch.Tensor) -> float:
    """The largest principal angle, in degrees, between the column spaces of ``u`` and ``v``."""
    return math.degrees(float(principal_angles(u, v).max()))


def orthonormal_rows(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (as columns, float64) of the row space of ``x``."""
    return torch.linalg.qr(x.double().mT).Q
