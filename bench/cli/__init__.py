"""``loram-bench``: compare LoRA initializers by what they cost and what they buy.

Commands, by job (each in its own module of this package, with its own flags):

  init cost     shapes, list, run, compare        (``bench.cli.init``)
  loss          loss, layer-loss                  (``bench.cli.loss``)
  sharded init  sharded                           (``bench.cli.sharded``)
  the gate      continuous, gate-error-rates      (``bench.cli.gate``)
  suites        quick (tox -e bench), full        (``bench.cli.quick``)
  report        report                            (``bench.cli.report``)
  adoption      init-adapter, adopt-cost          (``bench.cli.adopt``)

The command line is the top layer: the only one that builds reports; the benchmarks below
it return rows and tables. Building the parser imports no torch, so every ``--help`` is
instant; a command imports what it runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from bench.cli import adopt, gate, init, loss, quick, report, sharded
from bench.cli.flags import HelpFormatter

#: The command modules, in the order ``--help`` lists their commands.
COMMAND_MODULES = (init, loss, sharded, gate, quick, report, adopt)

DESCRIPTION = ("Compare LoRA initializers: init time and peak memory per layer shape (run), short-run loss on a real "
               "model and on a layer task at every shape (loss, layer-loss), sharded init (sharded), a regression "
               "gate (continuous), and one offline HTML report of a results folder (report). `loram-bench quick` "
               "runs the suite of `tox -e bench`.")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag, exit 2 (``--help`` still prints the usage);
    every flag's help shows its default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _attach_dash_values(argv: list[str]) -> list[str]:
    """``--shape -8x8`` as ``--shape=-8x8``: argparse takes a value that starts with a dash
    and a digit for a flag (and says the flag "expected one argument"); attached, the
    value reaches the flag's own check, which names what is wrong with it."""
    out: list[str] = []
    for token in argv:
        if out and re.match(r"-\d", token) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def build_parser() -> argparse.ArgumentParser:
    """Every command's parser. The initializer names are read from ``loram_ref``'s source
    (``bench.core.sources``): nothing here imports torch."""
    from bench.core.sources import initializer_names

    names = initializer_names()
    parser = _Parser(prog="loram-bench", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.setup_arguments(sub, names=names)
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
    from bench.gate.trees import Terminated

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
