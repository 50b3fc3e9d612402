"""The suites: ``quick`` (``tox -e bench``) and ``full`` (``tox -e bench-full``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.cli.args import add_common_run_args
from bench.cli.loss import print_layer_verdict, print_verdict
from bench.cli.report import write_report


def cmd_full(args) -> int:
    from bench.cli.suites import FULL_LAYER, FULL_LOSS, FULL_LOSS_PEERS
    from bench.core.results import read_rows
    from bench.layer.run import run_layer_loss
    from bench.layer.verdict import layer_verdict
    from bench.loss.run import run_loss

    started = time.perf_counter()
    parts = ("layer", "model", "peers") if args.part == "all" else (args.part,)
    if "layer" in parts:
        for suite in FULL_LAYER:
            part_started = time.perf_counter()
            print(f"full suite, {suite.describe()}", flush=True)
            run_layer_loss(suite.config(threads=args.threads), args.out, progress=not args.no_progress)
            print(f"  done in {time.perf_counter() - part_started:.0f} s", flush=True)
        print(f"layer level done in {time.perf_counter() - started:.0f} s", flush=True)
    for part, suite in (("model", FULL_LOSS), ("peers", FULL_LOSS_PEERS)):
        if part not in parts:
            continue
        model_started = time.perf_counter()
        config = suite.config(threads=args.threads)
        print(f"full suite, model level ({part}): {len(config.initializers)} initializers, {len(config.lrs)} starting "
              f"lrs (bracketed) on {len(config.selection_seeds)} selection seed(s), {len(config.seeds)} evaluation "
              f"seeds, {config.steps} steps into {args.out}", flush=True)
        run_loss(config, args.out, progress=not args.no_progress)
        print(f"model level ({part}) done in {time.perf_counter() - model_started:.0f} s", flush=True)
    layer_rows = read_rows(args.out / "layer_loss.jsonl") if (args.out / "layer_loss.jsonl").is_file() else []
    if layer_rows:
        print_layer_verdict(layer_verdict(layer_rows), args.out)
    if (args.out / "loss.jsonl").is_file():
        print_verdict(read_rows(args.out / "loss.jsonl"), args.out)
    path = write_report(args.out, args.out / "report.html", title="loram-bench full suite")
    print(f"full suite ({', '.join(parts)}) done in {time.perf_counter() - started:.0f} s")
    print(f"report: {path.resolve()}")
    return 0


def cmd_quick(args) -> int:
    from bench.cli.suites import run_quick

    started = time.perf_counter()
    parts = run_quick(args.out, progress=not args.no_progress, skip_loss=args.skip_loss, baseline=args.baseline)
    if not args.skip_loss:
        from bench.core.results import read_rows
        from bench.layer.verdict import layer_verdict

        print_layer_verdict(layer_verdict(read_rows(args.out / "layer_loss.jsonl")), args.out)
        print_verdict(read_rows(args.out / "loss.jsonl"), args.out)
    path = write_report(args.out, args.out / "report.html")
    for line, _ in parts:
        print(line)
    print(f"quick suite done in {time.perf_counter() - started:.0f} s")
    print(f"report: {path.resolve()}")
    failed = [line.split(" this run")[0] for line, all_failed in parts if all_failed]
    if failed:
        print(f"error: every one of the {' and '.join(failed)} failed; the reason column of each row says why",
              file=sys.stderr)
        return 1
    return 0


def setup_arguments(sub: argparse._SubParsersAction, **_) -> None:
    p = sub.add_parser("full", help="the full loss suites of `tox -e bench-full`: the layer task (a target rank x scale "
                                    "plane, shapes and alignments, LoRAM gains; 20 evaluation seeds) and the model-level "
                                    "grid (5 evaluation seeds), bracketed lrs, report")
    p.add_argument("--part", choices=("all", "layer", "model", "peers"), default="all",
                   help="run one part alone (each resumes into --out; the report covers what the folder holds)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_common_run_args(p)
    p.set_defaults(func=cmd_full)

    p = sub.add_parser("quick", help="the quick suite of `tox -e bench`: init cost, loss runs, report")
    p.add_argument("--skip-loss", action="store_true", help="init cost only: no layer task, no loss runs")
    p.add_argument("--baseline", type=Path, default=None,
                   help="also measure every init cell into this folder, interleaved (an A/A pair for compare)")
    add_common_run_args(p)
    p.set_defaults(func=cmd_quick)
