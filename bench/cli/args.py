"""What every command shares: value parsers for flags, the device check, the results
folder flags, ``--init-option``, and the one-line outcome of a run."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("results")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tib": 1 << 40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """``8GiB``, ``512M``, ``1.5g`` or plain bytes → bytes (argparse type of ``--memory-limit``)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 8GiB, 512MiB or a number of bytes)")
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is below 1 MiB: no worker can start under it")
    from bench.core.checks import check_memory_limit

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


#: The argparse types of the config fields' ``parse`` names (``bench.core.options``).
PARSERS = {"shape": parse_shape, "size": parse_size}


def check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested, but torch.cuda.is_available() is False")
    elif device != "cpu":
        raise ValueError(f"--device must be 'cpu' or 'cuda[:N]', got {device!r}")


def add_common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_report_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", action="store_true", help="write report.html into the results folder afterwards")


def summary(rows: list[dict], what: str) -> int:
    """Print how this run's rows ended; 1 when every one of them failed (the reasons are in
    the rows and were printed as they happened), else 0."""
    from bench.core.results import outcome_summary

    line, all_failed = outcome_summary(rows, what)
    print(line)
    if all_failed:
        print(f"error: every one of the {len(rows)} {what} failed; the reason column of each row says why",
              file=sys.stderr)
        return 1
    return 0


#: Keywords the harness passes itself besides the declared roles (the weight, the rank, the
#: scaling, the statistics): not settable by --init-option.
FIXED_KEYWORDS = ("weight", "rank", "scaling", "stats")


def init_option_keys(name: str) -> list[str]:
    """The keywords of initializer ``name`` a user may set with ``--init-option``: its
    keyword-only parameters, less those its registry entry gives the harness."""
    import inspect

    import loram_ref

    spec = loram_ref.get_initializer(name)
    harness = set(spec.harness.values()) | set(FIXED_KEYWORDS)
    params = inspect.signature(spec.fn).parameters
    return [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in harness]


def init_options(items: list[str] | None, initializers: list[str]) -> dict[str, dict[str, Any]]:
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
        spec = loram_ref.get_initializer(name)
        if name not in initializers:
            raise ValueError(f"--init-option {item!r}: {name} is not among --initializers")
        keys = init_option_keys(name)
        if key not in keys:
            harness = key in FIXED_KEYWORDS or key in spec.harness.values()
            what = "is set by the harness" if harness else f"is not a keyword of {name}"
            raise ValueError(f"--init-option {item!r}: {key!r} {what}; {name} takes "
                             + (", ".join(keys) if keys else "no option"))
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        options.setdefault(name, {})[key] = parsed
    return options


def add_init_option_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init-option", action="append", metavar="NAME.KEY=VALUE",
                   help="an initializer keyword, e.g. lora_da.solver=eigh (repeatable; `loram-bench list` names them)")
