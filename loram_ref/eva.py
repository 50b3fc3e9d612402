"""EVA: explained-variance adaptation from the layer's input activations (docs/initializers.md §6; Paischer et al. 2024, arXiv 2410.07170; PEFT eva)."""

from __future__ import annotations

import torch

from .registry import INPUT_SPACE, Invariant, Statistics, register
from .result import LoraInit
from .statistics.types import InputMomentsStats
from .validation import check_inputs
from .work import Work


def eva_work(m: int, n: int, r: int, itemsize: int) -> Work:
    """The centred covariance (n² writes) and its symmetric eigendecomposition (≈ 9·n³ flops
    with the vectors); W is not read."""
    return Work(read_bytes=n * n * 4, rw_bytes=2 * n * n * 4 + (m + n) * r * itemsize, flops=9.0 * n**3,
                gemm="square")


def eva_components(stats: InputMomentsStats, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The r leading principal components of the layer's inputs (r x n, rows) and the
    singular values of the centred data matrix (r,), signs as PEFT's incremental PCA sets
    them (each component's largest-|entry| positive)."""
    mean = stats.mean.float()
    cov = stats.second_moment.float() - torch.outer(mean, mean)
    cov = (cov + cov.mT) / 2
    values, vectors = torch.linalg.eigh(cov)
    top = vectors[:, -rank:].flip(1).mT.contiguous()  # descending eigenvalues, as rows
    lam = values[-rank:].flip(0).clamp(min=0.0)
    pivot = top.abs().argmax(dim=1)
    signs = torch.sign(top[torch.arange(rank, device=top.device), pivot])
    top *= torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    return top, (lam * stats.tokens).sqrt()


@register(
    "eva",
    harness=("check_input",),
    work=eva_work,
    invariant=Invariant.ZERO_PRODUCT,
    statistics=Statistics.INPUT_MOMENTS,
    cost=INPUT_SPACE,
    reads_weight=False,
    peft_name='"eva" (with rho = 1: no rank redistribution)',
    decomposition="eigendecomposition of the input covariance",
    label="EVA",
    paper="Paischer et al. 2024, EVA (arXiv 2410.07170); PEFT initialize_lora_eva_weights",
    summary="A = the r leading principal components of the layer's inputs, B = 0",
)
def eva(
    weight: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    *,
    stats: InputMomentsStats | None = None,
    whiten: bool = False,
    check_input: bool = False,
) -> LoraInit:
    """EVA (PEFT ``init_lora_weights="eva"``), docs/initializers.md §6.

    ``A`` = the r leading eigenvectors of the centred input covariance ``M − μμᵀ`` (rows,
    each signed so its largest-|entry| is positive, as PEFT's incremental PCA does);
    ``whiten=True`` divides row i by ``√S_i``, ``S_i = √(T·λ_i)`` the singular value of the
    centred data matrix. ``B = 0``: invariant (Z), W is neither read nor changed.

    PEFT reaches these components by an incremental randomized PCA over minibatches, stopped
    once successive estimates agree to cosine 0.99; this is the exact eigendecomposition of
    the same moments (tested against PEFT within that tolerance). PEFT's rank redistribution
    across layers (``rho > 1``) is a whole-model step: this per-layer function is PEFT's EVA
    with ``rho = 1``, where every layer keeps its rank.
    """
    scaling = check_inputs(weight, rank, scaling, check_input=check_input)
    if not isinstance(stats, InputMomentsStats):
        raise TypeError(f"stats must be an InputMomentsStats (the layer's input moments), got {type(stats).__name__}")
    stats.validate(tuple(weight.shape))
    m, n = weight.shape
    if rank > n:
        raise ValueError(f"eva takes r principal components of the d_in = {n} dimensional inputs: rank {rank} > {n}")
    total = float(torch.diagonal(stats.second_moment.float()).sum() - stats.mean.float().square().sum())
    if not total > 0:
        raise ValueError("eva: the inputs have zero variance (M − μμᵀ = 0), so they have no principal components; "
                         "collect the moments on varied data")
    a, singular = eva_components(stats, rank)
    if whiten:
        if bool((singular <= 0).any()):
            raise ValueError("eva(whiten=True): a kept component has zero variance; use whiten=False or more data")
        a = a / singular.sqrt()[:, None]
    ratio = float(singular.square().sum()) / (stats.tokens * total)
    b = torch.zeros(m, rank, dtype=weight.dtype, device=weight.device)
    return LoraInit(method="eva", A=a.to(device=weight.device, dtype=weight.dtype), B=b, scaling=scaling,
                    info={"whiten": whiten, "explained_variance_ratio": ratio})
