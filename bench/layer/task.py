"""What one layer-loss run is: an initializer trained on one layer task at one lr and seed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import loram_ref
from bench.layer.spec import ProblemSpec


@dataclass(frozen=True)
class LayerTask:
    """One run, executed in its own worker process (``bench.layer.worker``).

    ``scaling`` is the LoRA scaling ``s`` the adapter is trained with (``alpha`` and
    ``use_rslora`` say where it came from). ``batch_size`` is the mini-batch of sampled
    gradients, and in both modes the nominal batch the statistics passes assume (LoRA-SB's
    batches, LoRA-DA's ``N = steps · batch_size``). ``init_method`` is chosen by the driver:
    ``computed`` (the initializer runs on W) or ``known-svd`` (from W's known top triplets,
    where the method allows it and the full decomposition is predicted too slow).
    ``stats_lr``: the learning rate the statistics are collected at (the grid's first);
    other learning rates derive from it where the method allows (``InitializerSpec.rescale``).
    """

    initializer: str
    d_out: int
    d_in: int
    seed: int
    lr: float
    alignment: str
    rank: int = 8
    scaling: float = 1.0
    alpha: float = 8.0
    use_rslora: bool = False
    steps: int = 50
    gradients: str = "exact"
    batch_size: int = 64
    sb_samples: int = 8
    da_tokens: int = 0  # sampled LoRA-DA statistics: inputs drawn (0: 2·n)
    sb_warmup_ratio: float = 0.02
    spec: dict[str, Any] = field(default_factory=lambda: asdict(ProblemSpec()))
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    threads: int = 2
    role: str = ""
    preset: str = ""
    init_method: str = "computed"
    stats_lr: float = 0.0  # 0: the run's own lr
    cache_dir: str = ""
    arm: str = ""  # a magnitude arm's label ("gain 0.5", "matched to loram_dst gain 0.5"); "" for the others
    stage: str = "selection+evaluation"  # or "selection", "evaluation", "magnitude" (a label, not identity)

    @property
    def problem_spec(self) -> ProblemSpec:
        return ProblemSpec(**self.spec)

    @property
    def exact(self) -> bool:
        return self.gradients == "exact"

    def identity(self) -> dict[str, Any]:
        """What the run measures: everything but where it runs from (threads, cache, labels)
        and how its init was obtained (recorded in the row)."""
        skip = {"threads", "role", "preset", "init_method", "stats_lr", "cache_dir", "stage"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    @property
    def key(self) -> str:
        return _digest(self.identity())

    @property
    def config_key(self) -> str:
        """The configuration a verdict compares within: the run without its initializer,
        seed and lr (so one shape and one alignment)."""
        ident = self.identity()
        for name in ("initializer", "seed", "lr", "scaling", "alpha", "use_rslora", "options", "arm"):
            ident.pop(name)
        return _digest(ident)

    @property
    def plane_key(self) -> str:
        """The configuration across target ranks and scales (one shape, one alignment): the
        (target rank, target scale) plane the report draws."""
        ident = self.identity()
        for name in ("initializer", "seed", "lr", "scaling", "alpha", "use_rslora", "options", "arm"):
            ident.pop(name)
        ident["spec"] = {k: v for k, v in ident["spec"].items() if k not in ("target_rank", "target_scale")}
        return _digest(ident)

    @property
    def suite_key(self) -> str:
        """The configuration across shapes and alignments: what the size and alignment findings pool."""
        ident = self.identity()
        for name in ("initializer", "seed", "lr", "scaling", "alpha", "use_rslora", "options", "arm", "d_out", "d_in",
                     "alignment"):
            ident.pop(name)
        return _digest(ident)

    @property
    def group_key(self) -> str:
        """The runs that share one initializer call (its factors are cached between them):
        the target enters only through statistics, the lr only through statistics the method
        cannot rescale, and the seed only through the method's own draws (W is the same for
        every seed of a shape: ``ProblemSpec.weight_part``)."""
        spec = loram_ref.get_initializer(self.initializer)
        ident = self.identity()
        ident.pop("arm")
        kind = spec.statistics
        if not kind.needed:
            for name in ("lr", "alignment", "steps", "gradients", "batch_size", "sb_samples", "da_tokens",
                         "sb_warmup_ratio"):
                ident.pop(name)
            ident["spec"] = self.problem_spec.weight_part()
            if "generator" not in spec.harness:  # deterministic in W: one call per shape
                ident.pop("seed")
        elif kind.lr_rescale is None:  # statistics that do not depend on the lr
            ident.pop("lr")
        elif spec.rescale is not None:  # collected at stats_lr, rescaled to each run's lr
            ident.pop("lr")
            ident["stats_lr"] = self.collected_lr
        return _digest(ident)

    @property
    def collected_lr(self) -> float:
        """The lr the run's statistics are collected at."""
        spec = loram_ref.get_initializer(self.initializer)
        if spec.statistics.lr_rescale is not None and spec.rescale is not None and self.stats_lr:
            return float(self.stats_lr)
        return float(self.lr)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerTask":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
