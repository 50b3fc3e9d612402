"""What ``loram-bench sharded`` measures, as data (no torch: the command line builds its
flags from these fields, ``bench.cli.flags``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from bench.core.checks import check_fits, check_threads, check_world_size
from bench.core.options import option
from bench.core.shapes import ITEMSIZE, model_shapes, unique_shapes
from bench.sharded.tasks import PLACEMENTS, ShardedTask


@dataclass
class ShardedConfig:
    """What ``loram-bench sharded`` measures: every (initializer, shape, world size, placement)."""

    initializers: list[str] | None = option(None, help="sharded initializers (none: every one that has a sharded "
                                                       "version; `loram-bench list` says which)")
    shapes: list[tuple[int, int]] = option(factory=list, flag="--shape", append=True, parse="shape", metavar="MxN",
                                           help="a layer shape d_out x d_in (repeatable)")
    world_sizes: list[int] = option(factory=list, flag="--world-size", metavar="N", required=True,
                                    help="ranks per launch (one launch per world size), e.g. --world-size 2 4")
    placements: list[str] = option(factory=lambda: list(PLACEMENTS), flag="--placement", choices=tuple(PLACEMENTS),
                                   help="shard W by rows (DTensor Shard(0)) and/or columns (Shard(1))")
    presets: list[str] = option(factory=list, flag="--preset", append=True,
                                help="preset, config.json or model folder (repeatable): its unique shapes as well")
    rank: int = option(16, help="LoRA rank r")
    scaling: float = option(1.0, help="the LoRA scaling s")
    dtype: str = option("float32", choices=("float32", "bfloat16", "float16", "float64"), help="the weight's dtype")
    device: str = option("cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    threads: int | None = option(None, help="torch threads per rank (none: the cores divided among the ranks on "
                                            "CPU, 1 on CUDA)")
    seed: int = option(0, help="seed of the random weight and of the methods' draws")
    repeats: int = option(3, help="timed calls after the cold call")
    check: bool = option(True, flag="--no-check", help="skip the comparison with the single-process result")
    limit_s: float = option(300.0, flag="--limit",
                            help="seconds a row may take (setup, calls, check) before all ranks are killed (a timeout row)")

    def layer_shapes(self) -> list[tuple[int, int]]:
        """The presets' unique shapes, then ``shapes``, each once."""
        found = [(s.d_out, s.d_in) for p in self.presets for s in unique_shapes(model_shapes(p))]
        return list(dict.fromkeys(found + [tuple(s) for s in self.shapes]))

    def threads_for(self, world_size: int) -> int:
        if self.threads:
            return self.threads
        return 1 if self.device.startswith("cuda") else max(1, (os.cpu_count() or 1) // world_size)

    def tasks(self) -> list[ShardedTask]:
        """Validated tasks, grouped by world size (one launch each), then shape, placement, initializer."""
        from bench.sharded.plugins import load_plugins
        from loram_ref.sharded import SHARDED, get_sharded

        load_plugins()
        names = list(SHARDED) if self.initializers is None else self.initializers
        if not names:
            raise ValueError("--initializers is empty: name at least one sharded initializer")
        for name in names:
            get_sharded(name)  # an unknown name fails here, listing the known ones
        shapes = self.layer_shapes()
        if not shapes:
            raise ValueError("sharded needs --shape or --preset (e.g. --shape 28672x8192)")
        if not self.world_sizes or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.world_sizes):
            raise ValueError(f"--world-size must be integers >= 1, got {self.world_sizes}")
        for p in self.placements:
            if p not in PLACEMENTS:
                raise ValueError(f"--placement must be among {', '.join(PLACEMENTS)}, got {p!r}")
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"--dtype must be one of {', '.join(ITEMSIZE)}, got {self.dtype!r}")
        for flag, value, low in (("--rank", self.rank, 1), ("--repeats", self.repeats, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
        if not (self.limit_s > 0 and self.limit_s < float("inf")):
            raise ValueError(f"--limit must be > 0 and finite (seconds), got {self.limit_s}")
        for m, n in shapes:
            if self.rank > min(m, n):
                raise ValueError(f"--rank {self.rank} exceeds min(d_out, d_in) of shape {m}x{n}")
        check_threads(self.threads, "--threads (per rank)", "cuda" if self.device.startswith("cuda") else "cpu")
        check_world_size(self.world_sizes, self.device)
        # the shards of W, and on rank 0 the whole W and its single-process result for the check
        copies = 3 if self.check else 1
        check_fits({f"{m}x{n} {self.dtype}": copies * m * n * ITEMSIZE[self.dtype] for m, n in shapes},
                   "cpu" if self.device == "cpu" else "cuda:0",
                   "the shards" + (", and rank 0's whole W and single-process result of the check" if self.check else ""))
        return [ShardedTask(initializer=name, d_out=m, d_in=n, world_size=w, placement=p, rank=self.rank,
                            scaling=self.scaling, dtype=self.dtype, device=self.device, threads=self.threads_for(w),
                            seed=self.seed, repeats=self.repeats, check=self.check)
                for w in self.world_sizes for (m, n) in shapes for p in self.placements for name in names]


