"""The init-cost commands: ``shapes``, ``list``, ``run`` and ``compare``."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from bench.cli.args import add_common_run_args, add_report_flag, check_device, parse_shape, parse_size, summary
from bench.cli.report import report
from bench.core.identity import SPECTRA


def cmd_shapes(args) -> int:
    from bench.core.shapes import format_table, model_shapes, unique_shapes

    shapes = model_shapes(args.source)
    print(format_table(args.source, unique_shapes(shapes) if args.unique else shapes))
    return 0


def cmd_list(args) -> int:
    import loram_ref
    from bench.cli.args import init_option_keys
    from loram_ref.sharded import SHARDED

    for name, spec in sorted(loram_ref.INITIALIZERS.items()):
        print(f"{name:<13} [{spec.invariant.value}] {spec.summary}\n{'':<17}{spec.paper}")
        facts = spec.facts()
        facts["sharded"] = (("yes, gathering the weight on every rank" if SHARDED[name].gathers_weight else "yes")
                            if name in SHARDED else "no")
        print(f"{'':<17}" + "; ".join(f"{k}: {v}" for k, v in facts.items()))
        keys = init_option_keys(name)
        if keys:
            print(f"{'':<17}options (--init-option {name}.KEY=VALUE): {', '.join(keys)}")
        if name in SHARDED:
            print(f"{'':<17}sharded (loram-bench sharded): {SHARDED[name].summary}; sends {SHARDED[name].communication}")
    return 0


def cmd_run(args) -> int:
    import torch

    from bench.core.catalog import write_catalog
    from bench.core.checks import check_threads
    from bench.initcost.pyperf_format import export_init
    from bench.initcost.runner import Runner
    from bench.initcost.suite import init_tasks
    from bench.initcost.tasks import Task

    check_device(args.device)
    for flag, value, low in (("--values", args.values, 1), ("--warmups", args.warmups, 0), ("--processes", args.processes, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    check_threads(args.threads, device=args.device)
    if not (args.limit > 0 and math.isfinite(args.limit)):
        raise ValueError(f"--limit must be > 0 and finite (seconds), got {args.limit}")
    if not (args.value_budget >= 0 and math.isfinite(args.value_budget)):
        raise ValueError(f"--value-budget must be >= 0 and finite (seconds), got {args.value_budget}")
    threads = args.threads or (torch.get_num_threads() if args.device == "cpu" else 1)
    template = Task(initializer="", d_out=1, d_in=1, rank=args.rank, warmups=args.warmups, values=args.values,
                    min_values=min(args.values, 2), value_budget_s=args.value_budget, seed=args.seed,
                    spectrum=args.spectrum, processes=args.processes)
    if not args.preset and not args.shape:
        raise ValueError("run needs --preset or --shape (e.g. --preset llama-2-7b, --shape 28672x8192)")
    tasks = init_tasks(args.preset or [], args.initializers, rank=args.rank, dtype=args.dtype, device=args.device,
                       threads=threads, template=template, extra_shapes=args.shape)
    write_catalog(args.out, args.preset or [])
    runner = Runner(args.out / "init.jsonl", limit_s=args.limit, progress=not args.no_progress,
                    memory_limit_bytes=args.memory_limit, calibrate=not args.no_floor)
    rows = runner.run(tasks)
    csv_path, _ = export_init(rows, args.out)
    print(f"init results: {args.out / 'init.jsonl'} ({csv_path.name}, init.json)")
    code = summary([r for r in rows if r.get("run_id") == runner.run_id], "measurements")
    if args.report:
        report(args.out, args.out / "report.html")
    return code


def cmd_compare(args) -> int:
    from bench.initcost.compare import VERDICT_TEXT, Thresholds, compare_folders, exit_code, load_init, summarize

    comparison = compare_folders(args.base, args.new, Thresholds(args.threshold, args.memory_threshold, args.alpha))
    print(summarize(comparison))
    if args.history:
        from bench.initcost.history import append_history

        append_history(load_init(args.new).to_dict("records"), args.history)
    if args.report:
        new_dir = args.new if Path(args.new).is_dir() else Path(args.new).parent
        report(new_dir, args.report, comparison=comparison, title="loram-bench comparison")
    code = exit_code(comparison)
    print(VERDICT_TEXT[code])
    return code


def add_cell_flags(p: argparse.ArgumentParser, names: list[str], threads_help: str) -> None:
    """The flags that choose init cells: models or shapes, initializers, rank, dtype, device, threads."""
    p.add_argument("--preset", action="append", help="preset, config.json or model folder (repeatable)")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="MxN",
                   help="a layer shape d_out x d_in to measure as well (repeatable), e.g. 28672x8192")
    p.add_argument("--initializers", nargs="+", choices=names, default=None, help="initializers (none: all)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="the weight's dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=0, help=threads_help)


def setup_arguments(sub: argparse._SubParsersAction, names: list[str], **_) -> None:
    p = sub.add_parser("shapes", help="print the linear-layer shapes of a preset, config.json or model folder")
    p.add_argument("source", help="preset name (e.g. llama-3-70b), config.json path or model folder")
    p.add_argument("--unique", action="store_true", help="merge roles that share a shape")
    p.set_defaults(func=cmd_shapes)

    p = sub.add_parser("list", help="list the initializers, their options and their sharded versions")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="measure init time and peak memory per layer shape")
    add_cell_flags(p, names, "torch threads (0: torch's default)")
    p.add_argument("--limit", type=float, default=600.0, help="seconds per measurement before it is killed/skipped")
    p.add_argument("--values", type=int, default=5, help="timed values per measurement (after the first call)")
    p.add_argument("--warmups", type=int, default=1, help="untimed calls between the first call and the values")
    p.add_argument("--processes", type=int, default=3,
                   help="worker processes per measurement while within 2x the value budget")
    p.add_argument("--value-budget", type=float, default=30.0, help="stop taking values after this many seconds")
    p.add_argument("--no-floor", action="store_true", help="skip the hardware calibration (no per-cell floors)")
    p.add_argument("--memory-limit", type=parse_size, default=None, metavar="SIZE",
                   help="cap each worker's extra memory (e.g. 8GiB, 512MiB); an allocation beyond it is recorded as 'oom'")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weight")
    p.add_argument("--spectrum", choices=SPECTRA, default=SPECTRA[0],
                   help="the weight's spectrum: flat (i.i.d. N(0, 1/d_in) entries) or spiked (a decaying top above the "
                        "bulk, the layer task's W: where a top-r solver can beat a full SVD)")
    add_report_flag(p)
    add_common_run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="compare two runs; exit 1 on a significant slowdown, 2 if unmeasurable")
    p.add_argument("base", type=Path, help="baseline results folder or init.jsonl")
    p.add_argument("new", type=Path, help="new results folder or init.jsonl")
    p.add_argument("--threshold", type=float, default=0.10, help="minimum relative slowdown to flag")
    p.add_argument("--memory-threshold", type=float, default=0.05, help="minimum relative memory growth to flag")
    p.add_argument("--alpha", type=float, default=0.01, help="significance level of the Mann-Whitney U test")
    p.add_argument("--report", type=Path, default=None, help="write the comparison into this HTML report")
    p.add_argument("--history", type=Path, default=None, help="append NEW to this history file")
    p.set_defaults(func=cmd_compare)
