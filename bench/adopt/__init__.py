"""The adoption benchmark: what ``loram_ref.peft.initialize`` costs on a real model, next to
PEFT's own ``get_peft_model`` (:mod:`.cost`, each measurement in a fresh process by
:mod:`.worker`), and the same call on an FSDP2-sharded model under torchrun
(:mod:`.sharded_worker`): per-rank time, peak memory and bytes sent, and the gathered
result for the comparison with one process.
"""
