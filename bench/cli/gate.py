"""The regression gate's commands: ``continuous`` (a base revision and the working tree
measured interleaved) and ``gate-error-rates`` (the gate's false alarms and power, replayed)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from bench.cli.args import check_device, parse_size
from bench.cli.init import add_cell_flags
from bench.cli.report import gate_table, report
from bench.gate.rule import GATE_LIMIT_S, GateRule


def cmd_continuous(args) -> int:
    import loram_ref
    from bench.core.defaults import QUICK_PRESETS
    from bench.gate.continuous import ContinuousConfig, run_continuous
    from bench.gate.plant import parse_slow_down
    from bench.gate.rule import GateRule

    check_device(args.device)
    config = ContinuousConfig(
        base_rev=args.base_rev, presets=args.preset or ([] if args.shape else list(QUICK_PRESETS)),
        shapes=args.shape or [], initializers=args.initializers, rank=args.rank, dtype=args.dtype, device=args.device,
        threads=args.threads,
        rule=GateRule(args.screen_rounds, args.confirm_rounds, args.threshold, args.memory_threshold, args.margin),
        limit_s=args.limit, slow_down=parse_slow_down(args.slow_down, loram_ref.INITIALIZERS),
        memory_limit_bytes=args.memory_limit, gate_unchanged=args.gate_unchanged)
    result = run_continuous(config, args.out, progress=not args.no_progress, history=args.history)
    print(result.summary())
    rule = config.rule
    note = (f"The gate: per cell, rounds of one worker process per side, order alternating (A B, B A). ratio = NEW / "
            f"BASE, the geometric mean over rounds of each round's ratio of medians, with its 95 % t-interval. The "
            f"{rule.screen_rounds} screening rounds flag a ratio beyond 1 ± {rule.threshold:g} or a median peak-memory "
            f"change beyond {rule.memory_threshold:.0%} and 1 MiB; a flagged cell counts only when "
            f"{rule.confirm_rounds} fresh rounds, taken after every cell was screened, flag it again in the same "
            f"direction, their 95 % interval beyond 1 ± {rule.margin:g}. resolution: the smallest slowdown a cell "
            f"would confirm at the noise its rounds showed. The table, the init times below and both sides' pyperf "
            f"files are in {args.out}.")
    report(args.out, args.out / "report.html", comparison=gate_table(result.decisions),
            title=f"loram-bench continuous: {result.base.commit[:10]} -> {result.new.commit[:16]}", comparison_note=note)
    code = result.exit_code
    print({0: "gate: no regression", 1: "gate: REGRESSION (confirmed)",
           3: "gate: COULD NOT MEASURE some cells on one side"}[code] + f" ({result.seconds:.0f} s)")
    return code


def cmd_gate_error_rates(args) -> int:
    from bench.gate.rates import rate_table
    from bench.gate.rule import GateRule

    if not (math.isfinite(args.factor) and args.factor > 1):
        raise ValueError(f"--factor must be a finite number > 1, got {args.factor}")
    if args.draws < 100:
        raise ValueError(f"--draws must be >= 100, got {args.draws}")
    rules = [GateRule(s, c, t, args.memory_threshold, m) for s in args.screen_rounds for c in args.confirm_rounds
             for t in args.thresholds for m in args.margins]
    for rule in rules:
        rule.validate()
    table = rate_table(args.rounds, rules, args.factor, args.draws, args.target)
    if table.empty:
        raise ValueError("no rule fits: every file has fewer rounds per cell than --screen-rounds + --confirm-rounds")
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4f}".format):
        print(table.drop(columns=["file"]).to_string(index=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print(f"table: {args.out}")
    return 0


def setup_arguments(sub: argparse._SubParsersAction, names: list[str], **_) -> None:
    p = sub.add_parser("continuous", help="regression gate: BASE_REV and the working tree measured interleaved in one "
                                          "job; exit 1 on a confirmed slowdown or memory growth, 3 if unmeasurable")
    p.add_argument("base_rev", metavar="BASE_REV", help="the revision to compare against (e.g. HEAD~1, main, a commit)")
    add_cell_flags(p, names, "torch threads (0: 2 on CPU)")
    p.add_argument("--screen-rounds", type=int, default=GateRule.screen_rounds,
                   help="rounds (one process per side, order alternating) every cell gets")
    p.add_argument("--confirm-rounds", type=int, default=GateRule.confirm_rounds,
                   help="fresh rounds a flagged cell gets; it counts only if they flag it again")
    p.add_argument("--threshold", type=float, default=GateRule.threshold,
                   help="flag a time ratio beyond 1 + this (or below 1/(1 + this))")
    p.add_argument("--memory-threshold", type=float, default=GateRule.memory_threshold,
                   help="flag peak-memory growth beyond this fraction (and 1 MiB)")
    p.add_argument("--margin", type=float, default=GateRule.margin,
                   help="confirming rounds' 95%% interval must lie beyond 1 + this")
    p.add_argument("--limit", type=float, default=GATE_LIMIT_S,
                   help="seconds a worker may be predicted to take; slower cells are not gated (listed)")
    p.add_argument("--memory-limit", type=parse_size, default=None, metavar="SIZE", help="cap each worker's extra memory")
    p.add_argument("--slow-down", action="append", metavar="NAME=FACTOR",
                   help="self-test: make the working tree's NAME slower by FACTOR (e.g. loram_dst=1.3; repeatable)")
    p.add_argument("--gate-unchanged", action="store_true",
                   help="also measure initializers whose code is the same on both sides (an A/A study; by default "
                        "their cells are listed as unchanged and not measured)")
    p.add_argument("--history", type=Path, default=None, help="history file to append to (default: OUT/history.jsonl)")
    p.add_argument("--out", type=Path, default=Path("results-gate"), help="output folder (default: results-gate/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_continuous)

    p = sub.add_parser("gate-error-rates", help="the gate's false-alarm rate and power, replayed from A/A rounds "
                                                "(continuous.jsonl files with many rounds per cell)")
    p.add_argument("rounds", type=Path, nargs="+", help="continuous.jsonl files (or gate output folders) of A/A runs")
    p.add_argument("--screen-rounds", type=int, nargs="+", default=[GateRule.screen_rounds],
                   help="screening rounds of each rule replayed")
    p.add_argument("--confirm-rounds", type=int, nargs="+", default=[GateRule.confirm_rounds],
                   help="confirming rounds of each rule replayed")
    p.add_argument("--thresholds", type=float, nargs="+", default=[GateRule.threshold],
                   help="time thresholds of the rules replayed")
    p.add_argument("--memory-threshold", type=float, default=GateRule.memory_threshold,
                   help="the rules' peak-memory threshold")
    p.add_argument("--margins", type=float, nargs="+", default=[GateRule.margin],
                   help="confirming margins of the rules replayed")
    p.add_argument("--factor", type=float, default=1.3, help="the planted slowdown whose detection rate is measured")
    p.add_argument("--target", default=None, help="also report the power for this initializer")
    p.add_argument("--draws", type=int, default=20000, help="simulated gate runs per cell")
    p.add_argument("--out", type=Path, default=None, help="write the table as CSV here")
    p.set_defaults(func=cmd_gate_error_rates)

