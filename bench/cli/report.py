"""``loram-bench report`` and the report every other command writes: the command line is
the only layer that assembles reports (``reports``); the benchmarks return rows."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from bench.cli.args import DEFAULT_OUT

#: The results files a folder can hold; a report needs at least one.
RESULT_FILES = ("init.jsonl", "loss.jsonl", "layer_loss.jsonl", "sharded.jsonl")


def write_report(results_dir: Path, out: Path, comparison=None, title: str = "loram-bench report",
                 comparison_note: str | None = None) -> Path:
    from bench.core.defaults import SPEEDUP_REFERENCE
    from reports.html import COMPARE_NOTE, build_report

    return build_report(results_dir, out, comparison=comparison, title=title, speedup_reference=SPEEDUP_REFERENCE,
                        comparison_note=comparison_note or COMPARE_NOTE)


def report(results_dir: Path, out: Path, comparison=None, title: str = "loram-bench report",
           comparison_note: str | None = None) -> int:
    """Write the HTML report; where plotly is not installed (a GPU image without it), say so
    and go on: the measurements are in the results files either way."""
    if importlib.util.find_spec("plotly") is None:
        print(f"report: not written: plotly is not installed (pip install plotly, then `loram-bench report "
              f"{results_dir}`)", file=sys.stderr)
        return 1
    path = write_report(results_dir, out, comparison, title, comparison_note)
    print(f"report: {path.resolve()}")
    return 0


def gate_table(decisions):
    """The gate's decisions as the report's comparison table."""
    import pandas as pd

    columns = ["verdict", "stage", "initializer", "shape", "dtype", "device", "threads", "time_ratio", "resolution", "screen_ratio",
               "screen_low", "screen_high", "confirm_ratio", "confirm_low", "confirm_high", "memory_ratio",
               "base_median_s", "new_median_s", "rounds", "detail"]
    frame = pd.DataFrame(decisions)
    return frame[[c for c in columns if c in frame.columns]]


def cmd_report(args) -> int:
    if not args.results.exists():
        raise FileNotFoundError(f"no results folder or file at {args.results}; run `loram-bench run` or `quick` first")
    folder = args.results if args.results.is_dir() else args.results.parent
    if not any((folder / name).is_file() for name in RESULT_FILES) and args.results.is_dir():
        raise FileNotFoundError(f"{args.results} holds none of {', '.join(RESULT_FILES)}; is it a loram-bench results folder?")
    return report(args.results, args.out or folder / "report.html")


def setup_arguments(sub: argparse._SubParsersAction, **_) -> None:
    p = sub.add_parser("report", help="write the interactive HTML report of a results folder")
    p.add_argument("results", type=Path, nargs="?", default=DEFAULT_OUT, help="results folder (or one of its files)")
    p.add_argument("--out", type=Path, default=None, help="HTML path (none: RESULTS/report.html)")
    p.set_defaults(func=cmd_report)
