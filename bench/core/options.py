"""Configuration as data: each field of a benchmark's config dataclass is declared once,
with its name, type, default and help, and the command line makes its flag from that
declaration (``bench.cli.flags``). nanoGPT's config-as-data, with argparse.

>>> from dataclasses import dataclass
>>> @dataclass
... class Config:
...     steps: int = option(40, help="optimizer steps per run")
>>> Config().steps
40
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

#: Value parsers a field may name (``parse=``); the command line maps each to its argparse
#: type (``shape``: ``28672x8192``; ``size``: ``8GiB``).
PARSERS = ("shape", "size")


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Callable[[], Any] | None = None,
           flag: str | None = None, choices: tuple | str | None = None, parse: str | None = None,
           metavar: str | None = None, append: bool = False, required: bool = False, cli: bool = True) -> Any:
    """A config field with what its flag needs.

    ``help`` says what the field does (the flag's help; the default is shown beside it);
    ``flag`` names the flag when it is not ``--field-name``; ``choices`` are the allowed
    values (``"initializers"``: the registered initializer names); ``parse`` names a value
    parser of :data:`PARSERS`; ``append`` makes a repeatable flag (``--preset a --preset b``)
    instead of one taking several values; ``required`` makes the flag mandatory; ``cli=False``
    keeps the field off the command line. A boolean that defaults to True needs a ``flag``
    that turns it off (``--no-check``).
    """
    if not help:
        raise ValueError("every option needs its help text")
    if parse is not None and parse not in PARSERS:
        raise ValueError(f"parse must be one of {PARSERS}, got {parse!r}")
    metadata = {"help": help, "flag": flag, "choices": choices, "parse": parse, "metavar": metavar,
                "append": append, "required": required, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
