"""Sharded init on ``torch.distributed``: every ``loram_ref.sharded`` initializer on a weight
spread over N ranks launched by ``torchrun``, per (initializer, shape, world size,
placement, device): time of the slowest rank, per-rank peak memory, bytes each rank sent,
and the largest difference from the single-process result.

Files, one job each: ``tasks`` (what one row measures, and the row), ``weights`` (the
deterministic weight each rank builds its own shard of), ``worker`` (one rank:
``python -m bench.sharded.worker PLAN``), ``launch`` (one ``torchrun`` launch, watched,
killed at the limit), ``run`` (the plan, resuming, relaunching after a failure).
"""
