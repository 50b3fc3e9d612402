"""The layer task's grid of runs, as data (no torch: the command line builds its flags from
these fields, ``bench.cli.flags``); the problem's parameters are ``bench.layer.spec``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from bench.core.brackets import BRACKET_HELP, SELECTION_SEEDS_HELP
from bench.core.checks import check_fits, check_memory_limit, check_seeds_and_lrs, check_selection_seeds, check_threads
from bench.core.defaults import DEFAULT_LOSS_INITIALIZERS, LOSS_REFERENCE
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
                              help="evaluation seeds: each draws its own target, inputs and init draws, shared by every "
                                   "initializer (paired); W is one per shape")
    selection_seeds: list[int] = option(factory=list, metavar="S", help=SELECTION_SEEDS_HELP)
    lrs: list[float] = option(factory=lambda: [1e-3], metavar="LR",
                              help="the starting lr grid (AdamW, constant), extended at an edge (--no-bracket: not)")
    bracket: bool = option(True, flag="--no-bracket", help=BRACKET_HELP)
    target_ranks: list[int] = option(factory=list, metavar="K",
                                     help="target ranks swept (none: --target-rank alone)")
    target_scales: list[float] = option(factory=list, metavar="F",
                                        help="target scales ‖ΔW*‖_F/‖W‖_F swept (none: --target-scale alone)")
    loram_gains: list[float] = option(factory=list, metavar="C",
                                      help="magnitude arms: LoRAM at gain c·β (at its chosen lr) for each c, and "
                                           "noise_zeros at the lr matching each arm's first-step ‖ΔW_eff‖")
    equivalence_margin: float = option(0.02, help="the margin of 'as good as' claims (TOST), in normalized error")
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
    limit_s: float = option(600.0, flag="--limit", help="seconds per run: past it the run is stopped and recorded as a "
                                                         "timeout (its batch goes on)")
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
            if spec.layer_task_excluded:
                raise ValueError(f"{name} cannot run in the layer task: {spec.layer_task_excluded}; leave it out of "
                                 "--initializers")
            if spec.needs_statistics and spec.statistics.from_oracle is None:
                raise ValueError(f"{name}'s statistics cannot come from the layer task; leave it out of --initializers")
        for key in ("steps", "rank", "batch_size", "sb_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if isinstance(self.da_tokens, bool) or not isinstance(self.da_tokens, int) or self.da_tokens < 0:
            raise ValueError(f"--da-tokens must be an integer >= 0 (0: 2·d_in), got {self.da_tokens!r}")
        check_seeds_and_lrs(self.seeds, self.lrs)
        check_selection_seeds(self.selection_seeds, self.seeds, self.lrs)
        for flag, values in (("--target-ranks", self.target_ranks), ("--target-scales", self.target_scales),
                             ("--loram-gains", self.loram_gains)):
            if len(set(values)) != len(values):
                raise ValueError(f"{flag} lists a value twice: {values}")
        for k in self.target_ranks:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"--target-ranks must be integers >= 1, got {k!r}")
        for flag, values in (("--target-scales", self.target_scales), ("--loram-gains", self.loram_gains)):
            for value in values:
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                    raise ValueError(f"{flag} must be finite and > 0, got {value!r}")
        if self.loram_gains and not [n for n in self.initializers if "gain_multiplier" in keywords_of(n)]:
            raise ValueError("--loram-gains needs a LoRAM initializer (loram_dst or loram_rorth) in --initializers")
        if self.loram_gains and LOSS_REFERENCE not in self.initializers:
            raise ValueError(f"--loram-gains needs {LOSS_REFERENCE} in --initializers (its matched-magnitude runs)")
        if not (math.isfinite(self.equivalence_margin) and self.equivalence_margin > 0):
            raise ValueError(f"--equivalence-margin must be finite and > 0, got {self.equivalence_margin}")
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
        for spec in self.cell_specs():
            spec.validate(rank=self.rank)

    def cell_specs(self) -> list[ProblemSpec]:
        """The problem of every (target rank, target scale) cell swept, ranks outer."""
        ranks = self.target_ranks or [self.spec.target_rank]
        scales = self.target_scales or [self.spec.target_scale]
        return [replace(self.spec, target_rank=int(k), target_scale=float(f)) for k in ranks for f in scales]

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

    def checked_shapes(self) -> list[tuple[int, int, str, str]]:
        """:meth:`layer_shapes`, each checked against every cell's problem and the memory it needs."""
        self.validate()
        shapes = self.layer_shapes()
        for m, n, _, source in shapes:
            for spec in self.cell_specs():
                try:
                    spec.validate(m, n, self.rank)
                except ValueError as exc:
                    raise ValueError(f"{source or 'shape'} {m}x{n}: {exc}") from None
        # an initializer call sees the dense fp32 W (and an in-place one its pristine copy)
        check_fits({f"{m}x{n}": 2 * m * n * 4 for m, n, _, _ in shapes}, "cpu" if self.device == "cpu" else "cuda:0",
                   "the dense fp32 W an initializer call sees, and its copy")
        return shapes

    def task(self, shape: tuple[int, int, str, str], spec: ProblemSpec, alignment: str, name: str, seed: int,
             lr: float, stage: str, options: dict[str, Any] | None = None, arm: str = "") -> "LayerTask":
        """One run of the grid."""
        from bench.layer.task import LayerTask

        m, n, role, source = shape
        alpha, rslora, s = self.lora_setup(name)
        return LayerTask(
            initializer=name, d_out=m, d_in=n, seed=int(seed), lr=float(lr), alignment=alignment, rank=self.rank,
            scaling=s, alpha=alpha, use_rslora=rslora, steps=self.steps, gradients=self.gradients,
            batch_size=self.batch_size, sb_samples=self.sb_samples, da_tokens=self.da_tokens, sb_warmup_ratio=0.02,
            spec=asdict(spec), options={**self.options.get(name, {}), **(options or {})}, device=self.device,
            threads=self.threads, role=role, preset=source, stats_lr=float(self.lrs[0]), arm=arm, stage=stage)

    def cells(self) -> list[tuple[tuple[int, int, str, str], ProblemSpec, str]]:
        """Every (shape, problem, alignment) configuration, shapes smallest first."""
        return [(shape, spec, alignment) for shape in self.checked_shapes() for spec in self.cell_specs()
                for alignment in self.alignments]

    @property
    def selection_stage(self) -> str:
        return "selection" if self.selection_seeds else "selection+evaluation"

    def tasks(self) -> list["LayerTask"]:
        """The starting selection grid, in execution order: shape, then seed (one worker runs
        one shape and seed), cell, initializer, lr."""
        seeds = self.selection_seeds or self.seeds
        return [self.task(shape, spec, alignment, name, seed, lr, self.selection_stage)
                for shape in self.checked_shapes() for seed in seeds for spec in self.cell_specs()
                for alignment in self.alignments for name in self.initializers for lr in self.lrs]


def keywords_of(name: str) -> set[str]:
    """The keyword arguments initializer ``name`` accepts."""
    import inspect

    import loram_ref

    return set(inspect.signature(loram_ref.get_initializer(name).fn).parameters)
