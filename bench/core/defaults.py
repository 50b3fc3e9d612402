"""The defaults that pick initializers, chosen once for every command and benchmark: the
loss benchmarks' initializers when none are named, the reference each comparison is made
against, the rank and the presets of the quick suite."""

from __future__ import annotations

DEFAULT_RANK = 16

#: Initializers of the loss benchmarks when none are named (``loss``, ``layer-loss``, ``quick``).
DEFAULT_LOSS_INITIALIZERS = ["noise_zeros", "pissa_rsvd", "loram_dst", "lora_sb"]
#: The report's reference for init-time speedups: the cost users pay today (full-SVD PiSSA).
SPEEDUP_REFERENCE = "pissa"
#: The reference of loss comparisons: PEFT's default initializer.
LOSS_REFERENCE = "noise_zeros"
#: The quick suite's models: small-model and 7B shapes.
QUICK_PRESETS = ["smollm2-135m", "llama-2-7b"]
