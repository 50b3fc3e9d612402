"""Adopt an initializer on your own PEFT model (docs/adoption.md).

* :func:`initialize` sets the LoRA adapter of a ``peft.PeftModel`` with any registered
  initializer, in place (rewriting the base weights where the method does), sharded or
  not, and reports per layer the time, the invariant and the method's info;
* :func:`save_as_plain_lora` writes the trained adapter as a standard PEFT adapter for the
  original, unmodified base model;
* :func:`collect_statistics` runs a data-aware method's statistics pass on its own.

Needs ``peft`` (the ``loss`` extra); ``import loram_ref`` alone does not import it.
"""

from .init import InitReport, Initial, LayerReport, collect_statistics, initialize
from .plain import PlainAdapter, plain_adapter, save_as_plain_lora

__all__ = ["InitReport", "Initial", "LayerReport", "PlainAdapter", "collect_statistics", "initialize",
           "plain_adapter", "save_as_plain_lora"]
