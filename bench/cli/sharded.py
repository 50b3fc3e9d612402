"""``loram-bench sharded``: sharded init on torch.distributed, per world size. Its flags
are ``ShardedConfig``'s fields (``bench.cli.flags``)."""

from __future__ import annotations

import argparse

from bench.cli.args import PARSERS, add_common_run_args, check_device, summary
from bench.cli.flags import add_flags, from_flags
from bench.cli.report import report
from bench.sharded.config import ShardedConfig


def cmd_sharded(args) -> int:
    from bench.core.results import new_run_id
    from bench.sharded.run import RESULTS_FILE, run_sharded

    check_device(args.device)
    config = from_flags(ShardedConfig, args, device="cuda" if args.device.startswith("cuda") else args.device)
    say = (lambda text: None) if args.no_progress else (lambda text: print(text, flush=True))
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
    add_flags(p, ShardedConfig, parsers=PARSERS)
    add_common_run_args(p)
    p.set_defaults(func=cmd_sharded)
