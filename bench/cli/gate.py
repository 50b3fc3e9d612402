"""The regression gate's commands: ``continuous`` (a base revision and the working tree
measured interleaved) and ``gate-error-rates`` (the gate's false alarms and power, replayed)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from bench.cli.args import PARSERS, check_device
from bench.cli.flags import add_flags, from_flags
from bench.cli.report import gate_table, report
from bench.gate.config import ContinuousConfig
from bench.gate.rule import GateRule


def cmd_continuous(args) -> int:
    import loram_ref
    from bench.gate.continuous import run_continuous
    from bench.gate.plant import parse_slow_down

    check_device(args.device)
    values = {"base_rev": args.base_rev, "rule": from_flags(GateRule, args),
              "slow_down": parse_slow_down(args.slow_down, loram_ref.INITIALIZERS)}
    if not args.preset and args.shape:
        values["presets"] = []  # shapes named and no preset: only those shapes
    config = from_flags(ContinuousConfig, args, **values)
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
    add_flags(p, ContinuousConfig, parsers=PARSERS, choices={"initializers": names})
    add_flags(p.add_argument_group("the rule (docs/gate.md)"), GateRule, parsers=PARSERS)
    p.add_argument("--slow-down", action="append", metavar="NAME=FACTOR",
                   help="self-test: make the working tree's NAME slower by FACTOR (e.g. loram_dst=1.3; repeatable)")
    p.add_argument("--history", type=Path, default=None, help="history file to append to (none: OUT/history.jsonl)")
    p.add_argument("--out", type=Path, default=Path("results-gate"), help="output folder")
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

