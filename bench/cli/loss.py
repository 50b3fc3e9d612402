"""The loss commands: ``loss`` (model-level runs on a real model) and ``layer-loss`` (the
layer task at every shape). Their flags are their configs' fields (``bench.cli.flags``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.cli.args import (
    PARSERS,
    add_common_run_args,
    add_init_option_flag,
    add_report_flag,
    check_device,
    init_options,
    summary,
)
from bench.cli.flags import add_flags, from_flags
from bench.cli.report import report
from bench.layer.config import LayerConfig
from bench.layer.spec import ProblemSpec
from bench.loss.config import LossConfig


def print_verdict(rows, out: Path) -> None:
    from bench.loss.verdict import STATS_FILE, verdicts

    found = verdicts(rows)
    if not found:
        return
    print(f"loss verdict ({out / STATS_FILE}):")
    for text in found[0].sentences.values():
        print(f"  {text}")


def print_layer_verdict(verdict, out: Path) -> None:
    from bench.layer.verdict import FINDINGS_FILE, STATS_FILE

    if verdict is None:
        return
    print(f"layer-loss findings ({out / FINDINGS_FILE}; per shape and alignment: {out / STATS_FILE}):")
    for finding in verdict.findings:
        print(f"  {finding.text}")
    if not verdict.findings:
        print("  none: the size finding needs >= 2 shapes, the alignment finding the aligned and random alignments, "
              "both the reference noise_zeros")
    for line in plane_lines(verdict.plane):
        print(line)
    for line in magnitude_lines(verdict.magnitude):
        print(line)


def plane_lines(plane) -> list[str]:
    """Per (shape, alignment) plane with several cells and per initializer: where it wins and loses."""
    lines = []
    if plane is None or plane.empty:
        return lines
    for (shape, alignment), g in plane.groupby(["shape", "alignment"], sort=False):
        if len(g[["target_rank", "target_scale"]].drop_duplicates()) < 2:
            continue
        lines.append(f"the (target rank, scale) plane at {shape}, {alignment} target "
                     f"({len(g[['target_rank', 'target_scale']].drop_duplicates())} cells):")
        for name, gi in g[g["outcome"] != "reference"].groupby("initializer"):
            counts = gi["outcome"].value_counts()
            wins = ", ".join(f"k={int(r.target_rank)} scale {r.target_scale:g}" for r in gi.itertuples()
                             if r.outcome == "wins") or "nowhere"
            provisional = int((gi["lr_status"] != "bracketed").sum())
            lines.append(f"  {name}: wins {counts.get('wins', 0)}, loses {counts.get('loses', 0)}, as good as "
                         f"{counts.get('equivalent', 0)}, not told apart {counts.get('tie', 0)}; cannot reach the reference "
                         f"(its capacity floor) in {int((gi['reach'] == 'cannot reach').sum())}; wins at {wins}"
                         + (f"; {provisional} cell(s) provisional (lr at an edge)" if provisional else ""))
    return lines


def magnitude_lines(table) -> list[str]:
    """The loss at matched update magnitude, one line per LoRAM arm."""
    if table is None or table.empty:
        return []
    lines = ["loss at matched first-step update magnitude (LoRAM at gain c vs noise_zeros at the matching lr):"]
    for r in table.itertuples():
        interval = ("no interval" if r.diff_ci_low != r.diff_ci_low else
                    f"{r.diff_mean:+.3f} [{r.diff_ci_low:+.3f}, {r.diff_ci_high:+.3f}]")
        lines.append(f"  {r.initializer} gain {r.gain:g} at {r.shape}, {r.alignment} target k = {r.target_rank} of scale "
                     f"{r.target_scale:g} (lr {r.lr:.3g}): {r.loss_mean:.3f} vs "
                     f"{r.matched_loss_mean:.3f} at lr {r.matched_noise_lr:.3g} (first-step ‖ΔW‖ {r.first_step_norm:.3g} vs "
                     f"{r.matched_first_step_norm:.3g}): {interval} over {r.seeds} seeds; ρ(magnitude, error) within "
                     f"{r.initializer} {r.rho_within:+.2f}")
    return lines


def loss_config(args) -> LossConfig:
    """The ``loss`` command's grid (``run_loss`` validates it before loading anything)."""
    check_device(args.device)
    return from_flags(LossConfig, args, options=init_options(args.init_option, args.initializers))


def layer_config(args) -> LayerConfig:
    """The ``layer-loss`` command's grid (validated by ``LayerConfig.tasks`` before any work)."""
    check_device(args.device)
    return from_flags(LayerConfig, args, spec=from_flags(ProblemSpec, args),
                      options=init_options(args.init_option, args.initializers))


def cmd_loss(args) -> int:
    from bench.loss.run import run_loss

    rows = run_loss(loss_config(args), args.out, progress=not args.no_progress)
    print_verdict(rows, args.out)
    if args.report:
        return report(args.out, args.out / "report.html")
    return 0


def cmd_layer_loss(args) -> int:
    from bench.core.results import new_run_id
    from bench.layer.run import run_layer_loss
    from bench.layer.verdict import layer_verdict

    started = time.perf_counter()
    run_id = new_run_id()
    rows = run_layer_loss(layer_config(args), args.out, progress=not args.no_progress, run_id=run_id)
    print_layer_verdict(layer_verdict(rows), args.out)
    print(f"layer-loss done in {time.perf_counter() - started:.0f} s; rows in {args.out / 'layer_loss.jsonl'}")
    code = summary([r for r in rows if r.get("run_id") == run_id], "layer-loss runs")
    if args.report:
        report(args.out, args.out / "report.html")
    return code


def setup_arguments(sub: argparse._SubParsersAction, names: list[str], **_) -> None:
    choices = {"initializers": names}
    p = sub.add_parser("loss", help="short LoRA training runs per (initializer, lr, seed) on a real model, and their verdict")
    add_flags(p, LossConfig, parsers=PARSERS, choices=choices)
    add_init_option_flag(p)
    add_report_flag(p)
    add_common_run_args(p)
    p.set_defaults(func=cmd_loss)

    p = sub.add_parser("layer-loss", help="short training of each initializer on a synthetic layer task at every "
                                          "layer shape (up to 70B), per alignment, lr and seed, and its verdict")
    add_flags(p, LayerConfig, parsers=PARSERS, choices=choices)
    add_flags(p.add_argument_group("the layer task (recorded with every row as spec_ columns)"), ProblemSpec,
              parsers=PARSERS)
    add_init_option_flag(p)
    add_report_flag(p)
    add_common_run_args(p)
    p.set_defaults(func=cmd_layer_loss)
