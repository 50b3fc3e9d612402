"""Extra sharded initializers from modules named in ``LORAM_BENCH_SHARDED_PLUGINS``.

A comma-separated list of importable modules that register with
``loram_ref.sharded.registry.register_sharded``; both the command line (to accept their
names) and every rank (to run them) import them. The tests use it for initializers that
crash or hang on one rank.
"""

from __future__ import annotations

import importlib
import os

PLUGINS_ENV = "LORAM_BENCH_SHARDED_PLUGINS"


def load_plugins() -> list[str]:
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"{PLUGINS_ENV} names {name!r}, which cannot be imported ({exc}); fix the module name or "
                             "its PYTHONPATH, or unset the variable") from None
    return names
