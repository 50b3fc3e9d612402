"""The layer task's grid of runs, as data (no torch: the command line builds its flags from
these fields, ``bench.cli.flags``); the problem's parameters are ``bench.layer.spec``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bench.core.checks import check_fits, check_memory_limit, check_seeds_and_lrs, check_threads
from bench.core.defaults import DEFAULT_LOSS_INITIALIZERS
from bench.core.options import option
from bench.core.shapes import model_shapes, unique_shapes
from bench.layer.spec import ALIGNMENTS, GRADIENTS, SCALINGS, ProblemSpec

if TYPE_CHECKING:
    from bench.layer.task import LayerTask  # (imported in tasks(): it imports torch)


@dataclass
class LayerConfig:
    """A layer-loss grid. Every run of one (shape, seed) trains on the same problem and,
    in sampled mode, the same batches (a paired design across initializers)."""

    presets: list[str] = option(factory=list, flag="--preset", append=True,
                                help="preset, config.json or model folder (repeatable): its unique shapes")
    shapes: list[tuple[int, int]] = option(factory=list, parse="shape", metavar="MxN",
                                           help="layer shapes d_out x d_in, e.g. 28672x8192")
    initializers: list[str] = option(factory=lambda: list(DEFAULT_LOSS_INITIALIZERS), choices="initializers",
                                     help="initializers to train (see `loram-bench list`)")
    alignments: list[str] = option(factory=lambda: ["random"], flag="--alignment", choices=ALIGNMENTS,
                                   help="where the target update lives: W's top singular subspace, a random one, "
                                        "or W's bottom (null) directions")
    seeds: list[int] = option(factory=lambda: [0, 1, 2], metavar="S",
                              help="each seed draws its own W, target and inputs, shared by every initializer (paired)")
    lrs: list[float] = option(factory=lambda: [1e-3], metavar="LR", help="learning rates (AdamW, constant)")
    steps: int = option(50, help="optimizer steps per run")
    rank: int = option(8, help="LoRA rank r")
    alpha: float | None = option(None, help="lora_alpha (none: the rank, s = 1)")
    scaling: str = option("shared", choices=SCALINGS,
                          help="shared: every initializer at --alpha; published: each at its paper's scaling")
    gradients: str = option("exact", choices=GRADIENTS,
                            help="exact expectations over the inputs, or mini-batches of --batch-size sampled inputs")
    batch_size: int = option(64, help="sampled inputs per step (--gradients sampled)")
    sb_samples: int = option(8, help="inputs of LoRA-SB's gradient pass")
    da_tokens: int = option(0, help="sampled inputs of LoRA-DA's K-FAC pass (0: 2·d_in)")
    spec: ProblemSpec = option(factory=ProblemSpec, cli=False, help="the task's parameters (their own flags)")
    device: str = option("cpu", help="cpu or cuda[:N]")
    threads: int = option(0, help="torch threads per worker (0: up to 2 on CPU)")
    init_limit_s: float = option(60.0, flag="--init-limit",
                                 help="seconds an init may be predicted to take; beyond: PiSSA from the known SVD, "
                                      "others skipped")
    limit_s: float = option(600.0, flag="--limit", help="seconds per run before its worker is killed")
    memory_limit_bytes: int | None = option(None, flag="--memory-limit", parse="size", metavar="SIZE",
                                            help="cap each worker's extra memory (e.g. 8GiB)")
    options: dict[str, dict[str, Any]] = option(factory=dict, cli=False,
                                                help="per-initializer keywords (--init-option NAME.KEY=VALUE)")

    def validate(self) -> None:
        import loram_ref

        if not self.presets and not self.shapes:
            raise ValueError("layer-loss needs --preset or --shapes (e.g. --preset llama-2-7b, --shapes 28672x8192)")
        if not self.initializers:
            raise ValueError("--initializers is empty: name at least one (see `loram-bench list`)")
        for name in self.initializers:
            spec = loram_ref.get_initializer(name)
            if spec.needs_statistics and spec.statistics.from_oracle is None:
                raise ValueError(f"{name}'s statistics cannot come from the layer task; leave it out of --initializers")
        for key in ("steps", "rank", "batch_size", "sb_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if isinstance(self.da_tokens, bool) or not isinstance(self.da_tokens, int) or self.da_tokens < 0:
            raise ValueError(f"--da-tokens must be an integer >= 0 (0: 2·d_in), got {self.da_tokens!r}")
        check_seeds_and_lrs(self.seeds, self.lrs)
        if not self.alignments:
            raise ValueError("--alignment needs at least one value")
        for alignment in self.alignments:
            if alignment not in ALIGNMENTS:
                raise ValueError(f"--alignment must be among {', '.join(ALIGNMENTS)}, got {alignment!r}")
        for flag, values in (("--initializers", self.initializers), ("--alignment", self.alignments)):
            if len(set(values)) != len(values):
                raise ValueError(f"{flag} lists a value twice: {values}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--alpha must be finite and > 0, got {self.alpha}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"--scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if self.gradients not in GRADIENTS:
            raise ValueError(f"--gradients must be one of {', '.join(GRADIENTS)}, got {self.gradients!r}")
        for flag, value in (("--init-limit", self.init_limit_s), ("--limit", self.limit_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{flag} must be > 0 and finite (seconds), got {value}")
        check_threads(self.threads, device="cpu" if self.device == "cpu" else "cuda")
        check_memory_limit(self.memory_limit_bytes)
        self.spec.validate(rank=self.rank)

    def lora_setup(self, name: str) -> tuple[float, bool, float]:
        """``(lora_alpha, use_rslora, s)`` of ``name``'s runs."""
        import loram_ref

        if self.scaling == "published":
            published = loram_ref.get_initializer(name).published
            return published.lora_alpha(self.rank), published.rslora, published.scaling(self.rank)
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return alpha, False, alpha / self.rank

    def layer_shapes(self) -> list[tuple[int, int, str, str]]:
        """``(d_out, d_in, role, source)`` of every unique shape, smallest first."""
        found: dict[tuple[int, int], tuple[str, str]] = {}
        for preset in self.presets:
            for s in unique_shapes(model_shapes(preset)):
                found.setdefault((s.d_out, s.d_in), (s.role, preset))
        for d_out, d_in in self.shapes:
            found.setdefault((d_out, d_in), ("shape", ""))
        return sorted(((m, n, role, src) for (m, n), (role, src) in found.items()), key=lambda s: (s[0] * s[1], s[0]))

    def tasks(self) -> list["LayerTask"]:
        """Every run, in execution order: shapes smallest first (so cost laws exist before the
        large ones), then seed, initializer, alignment, lr (a group's runs are consecutive)."""
        from bench.layer.task import LayerTask

        self.validate()
        shapes = self.layer_shapes()
        for m, n, _, source in shapes:
            try:
                self.spec.validate(m, n, self.rank)
            except ValueError as exc:
                raise ValueError(f"{source or 'shape'} {m}x{n}: {exc}") from None
        # an initializer call sees the dense fp32 W (and an in-place one its pristine copy)
        check_fits({f"{m}x{n}": 2 * m * n * 4 for m, n, _, _ in shapes}, "cpu" if self.device == "cpu" else "cuda:0",
                   "the dense fp32 W an initializer call sees, and its copy")
        out = []
        for m, n, role, source in shapes:
            for seed in self.seeds:
                for name in self.initializers:
                    alpha, rslora, s = self.lora_setup(name)
                    for alignment in self.alignments:
                        for lr in self.lrs:
                            out.append(LayerTask(
                                initializer=name, d_out=m, d_in=n, seed=seed, lr=float(lr), alignment=alignment,
                                rank=self.rank, scaling=s, alpha=alpha, use_rslora=rslora, steps=self.steps,
                                gradients=self.gradients, batch_size=self.batch_size, sb_samples=self.sb_samples,
                                da_tokens=self.da_tokens, sb_warmup_ratio=0.02, spec=asdict(self.spec),
                                options=dict(self.options.get(name, {})), device=self.device, threads=self.threads,
                                role=role, preset=source, stats_lr=float(self.lrs[0])))
        return out

