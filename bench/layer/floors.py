"""Capacity floors: the lowest normalized error a run can reach with any amount of training,
computed before training from the initializer's step-0 factors, the target and Σ.

The loss is ``L = ‖E·Σ^½‖_F² / ‖ΔW*·Σ^½‖_F²`` with the error ``E = W_eff − W − ΔW*``
(``bench.layer.factored``). What training can change decides the floor:

* **A and B train** (every initializer but LoRA-SB). With ``P = B`` and the step-0
  factors ``P₀, A₀``, an initializer that keeps the function (invariants F and Z:
  ``W_res = W − s·P₀·A₀``) has ``E = s·P·A − C`` with ``C = s·P₀·A₀ + ΔW*``; a shifted one
  (invariant S: W unchanged) has ``C = ΔW*``. ``s·P·A`` is any matrix of rank ≤ r, so by
  Eckart-Young the floor is the energy of ``C·Σ^½`` beyond its top r singular values:

      floor = Σ_{i>r} σ_i²(C·Σ^½) / ‖ΔW*·Σ^½‖_F².

  For a zero product (noise-zeros) ``C = ΔW*`` and the floor is the target's own rank-r
  tail (0 when ``k ≤ r``). For an initializer whose product ``s·P₀·A₀`` is large and not
  aligned with the target (LoRAM, PiSSA against a random target), ``C`` has ``r + k``
  comparable singular values and the rank-r update must spend itself on cancelling the
  initial product: the floor is near 1 however long it trains.
* **Only A trains** (MiCA: B frozen at its step-0 value). ``E = s·B₀·X − C`` with X any
  r x n matrix, so the floor is what the projection onto ``col(B₀)`` leaves:

      floor = (‖C·Σ^½‖² − ‖Q_Bᵀ·C·Σ^½‖²) / ‖ΔW*·Σ^½‖².

* **Only R trains** (LoRA-SB: ``P = B·R`` with A and B frozen). ``E = B·X·A − C`` with
  ``X`` any r x r matrix (``s·(R − R₀)``, or ``s·R`` when shifted), so the floor is what
  the projection onto ``col(B) ⊗ row(A·Σ^½)`` leaves of ``C·Σ^½``:

      floor = (‖C·Σ^½‖² − ‖Q_Bᵀ·C·Σ^½·Q_A‖²) / ‖ΔW*·Σ^½‖².

Both are computed from factors in float64: QR of the m x c and n x c factor matrices
(``c = r + k``) and a c x c core, O((m+n)·c²) work and memory; no m x n matrix.
"""

from __future__ import annotations

import torch

from bench.layer.problem import Target


def _core(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``R_l·R_rᵀ`` of the thin QRs of ``left`` (m x c) and ``right`` (n x c): the c x c
    matrix with the singular values of ``left·rightᵀ``."""
    _, r_left = torch.linalg.qr(left)
    _, r_right = torch.linalg.qr(right)
    return r_left @ r_right.mT


def capacity_floor(a0: torch.Tensor, p0: torch.Tensor, scaling: float, target: Target, input_var: torch.Tensor,
                   rank: int, *, preserves_function: bool, only_middle: bool = False, only_a: bool = False,
                   b: torch.Tensor | None = None) -> float:
    """The run's capacity floor (see the module docstring).

    ``a0`` (r x n) and ``p0`` (m x r) are the step-0 factors (``p0 = B₀·R₀`` for LoRA-SB),
    ``scaling`` the LoRA scaling s. ``only_middle``: only LoRA-SB's R trains; ``b`` is then
    its frozen B (m x r). ``only_a``: only A trains (MiCA); ``b`` is its frozen B.
    """
    sqrt_var = input_var.to(target.right.device).double().sqrt()[:, None]
    t_left, t_right = target.left.double(), target.right.double() * sqrt_var  # ΔW*·Σ^½ = t_left·t_rightᵀ
    norm_sq = float(((t_left.mT @ t_left) * (t_right.mT @ t_right)).sum())
    if norm_sq <= 0.0:
        raise ValueError("the target is zero: its normalized error is undefined (use --target-scale > 0)")
    if preserves_function:
        c_left = torch.cat([p0.double() * scaling, t_left], 1)
        c_right = torch.cat([a0.double().mT * sqrt_var, t_right], 1)
    else:
        c_left, c_right = t_left, t_right
    core = _core(c_left, c_right)
    if only_a:
        if b is None:
            raise ValueError("capacity_floor(only_a=True) needs the frozen B as b")
        q_b, _ = torch.linalg.qr(b.double())
        _, r_right = torch.linalg.qr(c_right)
        projected = (q_b.mT @ c_left) @ r_right.mT  # Q_Bᵀ·C·Σ^½ in the row basis of C·Σ^½
        left_over = float(core.square().sum()) - float(projected.square().sum())
        return max(0.0, left_over) / norm_sq
    if only_middle:
        if b is None:
            raise ValueError("capacity_floor(only_middle=True) needs LoRA-SB's frozen B as b")
        q_b, _ = torch.linalg.qr(b.double())
        q_a, _ = torch.linalg.qr(a0.double().mT * sqrt_var)
        projected = (q_b.mT @ c_left) @ (c_right.mT @ q_a)  # Q_Bᵀ·C·Σ^½·Q_A, r x r
        left_over = float(core.square().sum()) - float(projected.square().sum())
        return max(0.0, left_over) / norm_sq
    energy = torch.linalg.svdvals(core).square()
    return float(energy[rank:].sum()) / norm_sq if len(energy) > rank else 0.0


def rank_floor(target: Target, input_var: torch.Tensor, rank: int) -> float:
    """The floor of a zero-product initializer: the target's own energy beyond rank r."""
    m, n = target.left.shape[0], target.right.shape[0]
    zero_a = torch.zeros(rank, n, dtype=torch.float64, device=target.right.device)
    zero_p = torch.zeros(m, rank, dtype=torch.float64, device=target.left.device)
    return capacity_floor(zero_a, zero_p, 1.0, target, input_var, rank, preserves_function=False)


def progress_fraction(final_loss: float, floor: float, start: float = 1.0) -> float | None:
    """How much of the possible progress a run made: ``(L₀ − L_T)/(L₀ − floor)`` (``L₀ = 1``
    for a function-preserving init); None where nothing was possible (floor ≥ start)."""
    room = start - floor
    if room <= 1e-9:
        return None
    return (start - final_loss) / room
