"""``loram-bench sharded``: sharded init on torch.distributed, per world size."""

from __future__ import annotations

import argparse

from bench.cli.args import add_common_run_args, check_device, parse_shape, summary
from bench.cli.report import report


def cmd_sharded(args) -> int:
    from bench.core.shapes import model_shapes, unique_shapes
    from bench.sharded.run import RESULTS_FILE, ShardedConfig, run_sharded

    check_device(args.device)
    import loram_ref.sharded

    shapes = list(dict.fromkeys([(s.d_out, s.d_in) for p in args.preset or [] for s in unique_shapes(model_shapes(p))]
                                + list(args.shape or [])))
    config = ShardedConfig(
        initializers=args.initializers or list(loram_ref.sharded.SHARDED), shapes=shapes, world_sizes=args.world_size,
        placements=args.placement, rank=args.rank, dtype=args.dtype, threads=args.threads or None,
        device="cuda" if args.device.startswith("cuda") else args.device,
        seed=args.seed, repeats=args.repeats, check=not args.no_check, limit_s=args.limit,
    )
    say = (lambda text: None) if args.no_progress else (lambda text: print(text, flush=True))
    from bench.core.results import new_run_id

    run_id = new_run_id()
    rows = run_sharded(config, args.out, say=say, run_id=run_id)
    failed = [r for r in rows if r.get("kind") == "sharded" and r.get("status") != "ok"]
    print(f"sharded results: {args.out / RESULTS_FILE} ({len(rows) - len(failed)} ok, {len(failed)} not measured)")
    code = summary([r for r in rows if r.get("kind") == "sharded" and r.get("run_id") == run_id], "sharded rows")
    report(args.out, args.out / "report.html")
    return code


def setup_arguments(sub: argparse._SubParsersAction, **_) -> None:
    p = sub.add_parser("sharded", help="sharded init on torch.distributed (torchrun, DTensor): time, per-rank peak "
                                       "memory, bytes sent and the difference from one process, per world size")
    p.add_argument("--world-size", type=int, nargs="+", required=True, metavar="N",
                   help="ranks per launch (one launch per world size), e.g. --world-size 2 4")
    p.add_argument("--preset", action="append", help="preset, config.json or model folder (repeatable)")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="MxN", help="a layer shape (repeatable)")
    p.add_argument("--initializers", nargs="+", default=None,
                   help="sharded initializers (default: all that have one; `loram-bench list` says which)")
    p.add_argument("--placement", nargs="+", default=["row", "col"], choices=["row", "col"],
                   help="shard W by rows (DTensor Shard(0)) and/or columns (Shard(1)); default both")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32",
                   help="the weight's dtype")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores / world size on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the cold call")
    p.add_argument("--limit", type=float, default=300.0,
                   help="seconds a row may take (setup, calls, check) before all ranks are killed (a timeout row)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the single-process result")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weight and of the methods' draws")
    add_common_run_args(p)
    p.set_defaults(func=cmd_sharded)

