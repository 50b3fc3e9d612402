"""The defaults that pick initializers, chosen once for every command and benchmark: the
loss benchmarks' initializers when none are named, the reference each comparison is made
against, the rank and the presets of the quick suite."""

from __future__ import annotations

DEFAULT_RANK = 16

#: Initializers of the loss benchmarks when none are named (``loss``, ``layer-loss``, ``quick``).
DEFAULT_LOSS_INITIALIZERS = ["noise_zeros", "pissa_rsvd", "loram_dst", "lora_sb"]
#: The model-level grid of ``loram-bench full --part peers``: the reference and the
#: initializers a PEFT user chooses among beyond the default four (PEFT's other
#: ``init_lora_weights`` options), plus MiLoRA and LoRA-One.
PEER_LOSS_INITIALIZERS = ["noise_zeros", "olora", "orthogonal", "mica", "milora", "lora_ga", "corda", "eva", "lora_one",
                          "loftq"]
#: The report's reference for init-time speedups: the cost users pay today (full-SVD PiSSA).
SPEEDUP_REFERENCE = "pissa"
#: The reference of loss comparisons: PEFT's default initializer.
LOSS_REFERENCE = "noise_zeros"
#: The quick suite's models: small-model and 7B shapes.
QUICK_PRESETS = ["smollm2-135m", "llama-2-7b"]
#: Initializers the quick suite measures on its first preset's shapes only: a full
#: decomposition of W (or of W·C, or of the input covariance), or LoRA-One's 512-column
#: sketch, costs 13-32 s per 7B cell on 2 cores (about 160 s of the suite together), and the
#: quick suite is CI's main job; the certified Krylov PiSSA falls back to a full SVD on the
#: harness's flat Gaussian weights after a quarter of its cost. ``loram-bench run --preset
#: llama-2-7b``, ``continuous`` and the full suites measure their 7B cells.
QUICK_SMALL_ONLY = ["mica", "milora", "corda", "eva", "lora_one", "loftq", "pissa_krylov"]
