"""LoRA-DA: data-aware initialization by asymptotic analysis (docs/initializers.md §4; Zhang et al., arXiv 2510.24561)."""

from __future__ import annotations

import math

from typing import Any

import torch

from .fidelity import angle_deg, orthonormal_rows
from .linalg import randomized_svd
from .registry import INPUT_SPACE, Invariant, PublishedScaling, Statistics, register
from .result import LoraInit
from .work import input_space
from .statistics.types import LoraDAStats
from .validation import check_inputs, check_positive_int, resolve_generator


def _sym(x: torch.Tensor) -> torch.Tensor:
    return (x + x.mT).mul_(0.5)


def smallest_eigenvectors(
    omega: torch.Tensor, rank: int, *, solver: str, niter: int, generator: torch.Generator
) -> tuple[torch.Tensor, dict]:
    """``r`` eigenvectors of the ``r`` smallest (algebraic) eigenvalues of symmetric ``omega``.

    ``solver="lobpcg"`` is the code's ``torch.lobpcg(largest=False, niter)`` from a seeded
    Gaussian start orthonormalized by QR (docs/initializers.md §4 step 6); LOBPCG needs ``n >= 3r``, so
    where it cannot run this falls back to the exact ``torch.linalg.eigh`` (resolution c)
    and says so in the returned info. ``solver="eigh"`` asks for the exact one.
    Each column's sign is fixed so that its largest-magnitude entry is positive.
    """
    n = omega.shape[0]
    info: dict = {"eigensolver": solver}
    if solver == "lobpcg" and n < 3 * rank:
        info = {"eigensolver": "eigh", "fallback": f"lobpcg needs n >= 3r, got n={n}, r={rank}"}
        solver = "eigh"
    if solver == "lobpcg":
        start = torch.linalg.qr(torch.randn(n, rank, dtype=omega.dtype, device=omega.device, generator=generator)).Q
        _, vecs = torch.lobpcg(omega, k=rank, X=start, niter=niter, largest=False)
        info["lobpcg_niter"] = niter
    elif solver == "eigh":
        _, all_vecs = torch.linalg.eigh(omega)  # ascending eigenvalues
        vecs = all_vecs[:, :rank].clone()
    else:
        raise ValueError(f"solver must be 'lobpcg' or 'eigh', got {solver!r}")
    peak = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs.gather(0, peak[None, :]))
    signs[signs == 0] = 1.0
    return vecs.mul_(signs), info


def stable_seed(*parts: object) -> int:
    """The official code's per-module seed: blake2b (8-byte digest) of the parts' ``str``
    joined by ``::``, little endian, modulo 2⁶³−1. Shapes are written as ``torch.Size``."""
    import hashlib

    text = "::".join(str(torch.Size(p)) if isinstance(p, tuple) else str(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63 - 1)


def eigen_residual(omega: torch.Tensor, q: torch.Tensor) -> float:
    """``max_j ‖Ω·q_j − (q_jᵀΩq_j)·q_j‖ / ‖Ω‖_F``: 0 for exact eigenvectors, O(n²·r)."""
    oq = omega @ q
    rayleigh = (q * oq).sum(0)
    res = (oq - q * rayleigh[None, :]).norm(dim=0).max()
    scale = torch.linalg.matrix_norm(omega)
    return float(res / scale) if float(scale) > 0 else 0.0


#: Damping escalation when fp32 Cholesky of ``sym(Z) + λI`` fails: λ x 10 per retry.
DAMPING_RETRIES = 8


#: A shift λ beyond this fraction of Z's mean diagonal means Z is not positive semi-definite.
MAX_RELATIVE_DAMPING = 1e-2


def _damped_cholesky(z: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """Cholesky factor of ``z + λI``, raising λ tenfold until fp32 factorization succeeds.

    Decision (docs/initializers.md §4 leaves it open): the code's λ = 1e-6 assumes many more tokens than
    input features (256 samples of up to 1024 tokens). With fewer tokens, ``Z`` is rank
    deficient and fp32 Cholesky of ``Z + 1e-6·I`` can fail; escalating λ, as CorDA does
    for its covariance, keeps the method defined, and the λ used is recorded.
    """
    diag = z.diagonal()
    if bool((diag < 0).any()):
        raise ValueError("stats.input_factor is not positive definite: it has negative diagonal entries; it must be "
                         "the second moment (1/T)·Σ x·xᵀ of the layer's inputs")
    scale = float(diag.mean())
    lam = 0.0
    for attempt in range(DAMPING_RETRIES + 1):
        step = damping * 10**attempt
        z.diagonal().add_(step - lam)
        lam = step
        chol, status = torch.linalg.cholesky_ex(z)
        if int(status) == 0:
            if lam > max(damping, MAX_RELATIVE_DAMPING * scale):
                raise ValueError(f"stats.input_factor is not positive definite: Cholesky needed a shift λ = {lam:g}, "
                                 f"more than {MAX_RELATIVE_DAMPING:g} of its mean diagonal {scale:g}; it must be the second "
                                 "moment (1/T)·Σ x·xᵀ of the layer's inputs")
            return chol, lam
    raise ValueError(
        f"stats.input_factor is not positive definite even with damping {lam:g}: collect more tokens or pass a larger damping"
    )


#: Largest n for which LoRA-DA's exact eigendecomposition of Ω (n x n) is affordable (its fidelity diagnostic).
EIGH_MAX_N = 4096


def lora_da_fidelity(weight: torch.Tensor, rank: int, init: LoraInit, kwargs: dict[str, Any]) -> dict[str, float]:
    """Largest angle (°) between LOBPCG's subspace and the exact one (n <= :data:`EIGH_MAX_N`)."""
    out = {"eig_residual": float(init.info.get("eig_residual", math.nan))}
    if weight.shape[1] > EIGH_MAX_N or init.info.get("eigensolver") == "eigh":
        return out
    exact = lora_da(weight, rank, init.scaling, **{**kwargs, "solver": "eigh"})
    out["angle_deg_to_eigh"] = angle_deg(orthonormal_rows(init.A), orthonormal_rows(exact.A))
    return out


@register(
    "lora_da",
    harness=("generator", "module", "check_input"),
    work=input_space,
    fidelity=lora_da_fidelity,
    invariant=Invariant.SHIFTED,
    decomposition="LOBPCG on the n x n guidance Ω (Cholesky of Z)",
    statistics=Statistics.LORA_DA,
    cost=INPUT_SPACE,
    published=PublishedScaling(alpha=16.0, rslora=True, source="official default config: rsLoRA, α = 16 (s = 16/√r; docs/initializers.md §4)"),
    paper="Zhang et al. 2025, LoRA-DA (arXiv 2510.24561, ICML 2026); zqy0126/LoRA-DA",
    summary="A = Qᵀ/√γ, B = Δ̂·Q/√γ with Q the smallest-r eigvecs of Ω = -Δ̂ᵀΔ̂ + β·Σd/(Nσ₁²)·Z⁻¹; W unchanged",
)
def lora_da(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    stats: LoraDAStats | None = None,
    beta_var: float = 0.03,
    alpha_bias: float = 1.0,
    damping: float = 1e-6,
    gamma: float = 1024.0,
    solver: str = "lobpcg",
    lobpcg_niter: int = 10,
    delta_svd_niter: int = 16,
    normalize_delta: bool = True,
    generator: torch.Generator | None = None,
    seed: int = 0,
    official_seed: int | None = None,
    module: str = "",
    check_input: bool = True,
) -> LoraInit:
    """LoRA-DA as the official code implements it (docs/initializers.md §4 "Algorithm as implemented").

    In PyTorch orientation (W is m x n):

    3. ``Δ = -diag(d)·G·Z_λ⁻¹`` with ``Z_λ = sym(Z) + λI`` and ``d = 1/(y² + λ)``: the
       K-FAC natural-gradient step, via a Cholesky solve.
    4. ``Δ̂ = Δ/σ₁`` with ``σ₁`` the top singular value of Δ (randomized SVD, q=1,
       ``delta_svd_niter``; ``normalize_delta=False`` keeps σ₁ = 1).
    5. ``Ω = -α_bias·Δ̂ᵀΔ̂ + β_var·(Σ_i d_i)/(N·σ₁²)·Z_λ⁻¹`` (n x n), symmetrized.
    6. ``Q`` = eigenvectors of the r smallest eigenvalues of Ω (Courant-Fischer).
    7. ``A = Qᵀ/√γ`` (r x n), ``B = Δ̂·Q/√γ`` (m x r), so ``B·A = Δ̂·QQᵀ/γ``.
    8. ``W`` is not modified: invariant (S), ``W_eff = W + (s/γ)·Δ̂·QQᵀ``.

    Decisions: where fp32 Cholesky of ``Z_λ`` fails (fewer tokens than input features),
    λ is raised tenfold until it succeeds and ``info["damping"]`` records it. Defaults are the code's ``conf/lora_da.yaml`` (β_var 0.03, λ 1e-6,
    γ 1024, LOBPCG niter 10, normalized Δ); ``beta_var=1`` is the paper's theory
    (resolution a). ``scaling`` is recorded and not folded into the factors (the code
    uses rsLoRA ``s = α/√r`` outside the init). Adapters are returned in fp32, as the
    code stores them (``init.dtype: fp32``). Randomness (σ₁'s test vector, LOBPCG's start)
    comes from one local generator.

    Args:
        stats: mean gradient, input and output factors and N, see
            :class:`loram_ref.statistics.LoraDAStats`.
        solver: ``"lobpcg"`` (faithful; falls back to ``"eigh"`` when n < 3r) or ``"eigh"``,
            the converged mode: the exact smallest-r eigenvectors. At the code's 10
            iterations LOBPCG does not converge on realistic statistics (17-84° from the
            exact subspace, in both codes): its random start decides the subspace.
            ``info["eig_residual"]`` records ``max_j ‖Ω·q_j − λ_j·q_j‖ / ‖Ω‖_F`` (0 when
            converged); the harness adds the largest principal angle to ``eigh``'s
            subspace where n <= 4096 (:func:`lora_da_fidelity`).
        official_seed: reproduce the official code's seeds (``conf/lora_da.yaml``
            ``deterministic_seed``, 9 there): σ₁'s test vector and LOBPCG's start are then
            drawn from generators seeded per module by the code's stable hash of
            (purpose, shape, q or r, niter, deterministic_seed, ``module``, ...), as
            ``_stable_seed`` defines it (blake2b, 8 bytes, little endian, mod 2⁶³−1).
            ``None`` (default): one local generator seeded with ``seed``.
        module: the module's name in the base model (e.g. ``model.layers.0.self_attn.q_proj``),
            part of the official per-module seed.
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    if not isinstance(stats, LoraDAStats):
        raise TypeError(f"stats must be a LoraDAStats, got {type(stats).__name__}")
    m, n = weight.shape
    stats.validate((m, n))
    for value, label in ((beta_var, "beta_var"), (alpha_bias, "alpha_bias"), (damping, "damping"), (gamma, "gamma")):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{label} must be finite and > 0, got {value}")
    lobpcg_niter = check_positive_int(lobpcg_niter, "lobpcg_niter")
    delta_svd_niter = check_positive_int(delta_svd_niter, "delta_svd_niter", minimum=0)
    gen = resolve_generator(generator, weight.device, seed)
    eig_gen = gen
    if official_seed is not None:  # the official per-module seeds (zqy0126/LoRA-DA, deterministic_seed)
        gen = torch.Generator(device=weight.device).manual_seed(
            stable_seed("lora_da_svd_lowrank", (n, m), 1, delta_svd_niter, official_seed, module, "delta"))
        eig_gen = torch.Generator(device=weight.device).manual_seed(
            stable_seed("lora_da_lobpcg", (n, n), rank, False, lobpcg_niter, official_seed, module, beta_var))
    f32 = dict(dtype=torch.float32, device=weight.device)

    chol, damping_used = _damped_cholesky(_sym(stats.input_factor.to(**f32)), damping)  # Z_λ = sym(Z) + λI
    d = stats.output_factor.to(**f32).add(damping).reciprocal_()  # d = 1/(y² + λ)
    # Δᵀ = -Z_λ⁻¹·Gᵀ·diag(d)  (n x m): docs/initializers.md §4 step 3, transposed as the code forms it
    delta_t = torch.cholesky_solve(stats.grad.to(**f32).mT, chol).mul_(d[None, :]).neg_()
    if normalize_delta:
        sigma1 = float(randomized_svd(delta_t, 1, delta_svd_niter, gen)[1][0])
        if sigma1 == 0.0:
            raise ValueError("stats.grad is zero: the natural-gradient displacement Δ vanishes")
        delta_t.div_(sigma1)  # Δ̂ = Δ/σ₁  (step 4)
    else:
        sigma1 = 1.0
    # Ω = -α·Δ̂ᵀΔ̂ + β·(Σd)/(N σ₁²)·Z_λ⁻¹   (step 5)
    omega = torch.cholesky_inverse(chol).mul_(beta_var * float(d.sum()) / (stats.num_train * sigma1**2))
    del chol
    omega.addmm_(delta_t, delta_t.mT, alpha=-alpha_bias)
    omega = _sym(omega)
    q, info = smallest_eigenvectors(omega, rank, solver=solver, niter=lobpcg_niter, generator=eig_gen)  # step 6
    info["eig_residual"] = eigen_residual(omega, q)  # how far from converged: 0 for exact eigenvectors
    del omega
    inv_root_gamma = 1.0 / math.sqrt(gamma)
    a = q.mT.mul(inv_root_gamma).contiguous()  # step 7: A = Qᵀ/√γ
    b = (delta_t.mT @ q).mul_(inv_root_gamma)  # step 7: B = Δ̂·Q/√γ
    info.update({"sigma_1": sigma1, "gamma": gamma, "beta_var": beta_var, "damping": damping_used})
    return LoraInit(method="lora_da", A=a, B=b, scaling=scaling, info=info)
