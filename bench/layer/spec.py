"""The layer task's parameters, as data (no torch): :class:`ProblemSpec`, recorded with
every row as ``spec_`` columns, and the values the task's choices take."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from bench.core.options import option

#: Where the target update lives relative to W's singular subspaces.
ALIGNMENTS = ("aligned", "random", "bottom")
#: Input covariance spectra.
INPUT_SPECTRA = ("isotropic", "decaying")



@dataclass(frozen=True)
class ProblemSpec:
    """The task's parameters, recorded with every row (``spec_`` columns)."""

    top_directions: int = option(32, help="t: singular values of W above its bulk")
    top_strength: float = option(4.0, help="κ: σ_1 = edge·(1 + κ), σ_i = edge·(1 + κ·i^-p)")
    top_decay: float = option(1.0, help="p: how fast W's top singular values fall towards the bulk edge")
    target_rank: int = option(16, help="k: rank of the target update")
    target_decay: float = option(1.0, help="q: the target's singular values decay as j^-q")
    target_scale: float = option(0.01, help="‖ΔW*‖_F as a fraction of ‖W‖_F (0.01: the low end of what 40 steps of "
                                            "LoRA reach on SmolLM2-135M, 0.006-0.05 per projection as the model-level "
                                            "benchmark measures it)")
    input_spectrum: str = option("isotropic", choices=("isotropic", "decaying"),
                                 help="the input covariance: identity, or eigenvalues i^-d (mean 1)")
    input_decay: float = option(1.0, help="d: the decaying input spectrum's exponent")
    weight_seed: int = option(0, help="the seed of W and its singular directions: one W per layer shape, shared by "
                                      "every seed (seeds vary the target, the batches and the inits' draws)")

    def validate(self, m: int | None = None, n: int | None = None, rank: int | None = None) -> None:
        if isinstance(self.weight_seed, bool) or not isinstance(self.weight_seed, int) or self.weight_seed < 0:
            raise ValueError(f"--weight-seed must be an integer >= 0, got {self.weight_seed!r}")
        for name in ("top_directions", "target_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        for name in ("top_strength", "top_decay", "target_decay", "target_scale", "input_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be finite and > 0, got {value!r}")
        if self.input_spectrum not in INPUT_SPECTRA:
            raise ValueError(f"--input-spectrum must be one of {', '.join(INPUT_SPECTRA)}, got {self.input_spectrum!r}")
        if self.target_rank > self.top_directions:
            raise ValueError(f"--target-rank {self.target_rank} exceeds --top-directions {self.top_directions}: an "
                             "aligned target lives in W's top singular subspace, which must hold it")
        if rank is not None and rank > self.top_directions:
            raise ValueError(f"--rank {rank} exceeds --top-directions {self.top_directions}: PiSSA's top-r triplets "
                             "must be among the known ones")
        if m is not None and n is not None and 2 * self.top_directions > min(m, n):
            raise ValueError(f"layer {m}x{n} is too small for --top-directions {self.top_directions}: W keeps "
                             f"2 x {self.top_directions} orthogonal directions (top and bottom); use fewer")

    def weight_part(self) -> dict[str, Any]:
        """The parameters W depends on (not the target's, nor the inputs'): runs that agree on
        these and on the shape see the same W."""
        return {"top_directions": self.top_directions, "top_strength": self.top_strength,
                "top_decay": self.top_decay, "weight_seed": self.weight_seed}

    def fields(self) -> dict[str, Any]:
        return {f"spec_{k}": v for k, v in asdict(self).items()}



#: ``--gradients``: exact expectations over the input distribution, or sampled mini-batches.
GRADIENTS = ("exact", "sampled")
#: ``--scaling``: every initializer at the shared alpha, or each at its published one.
SCALINGS = ("shared", "published")


