"""What identifies a measurement: one key shape (:func:`digest` of the identifying fields)
for every row kind, and the init cell's identity, used by resume, cost-law prediction,
compare, report grouping and history.

A *cell* is one initializer on one layer shape with everything that changes what is
measured (rank, scaling, dtype, device, threads, options), not how often it is measured
(values, processes, budgets). A *family* is a cell without its shape: the cells one cost
law is fitted to and one line in a chart joins.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

IDENTITY_FIELDS: tuple[str, ...] = ("initializer", "d_out", "d_in", "rank", "scaling", "dtype", "device", "threads",
                                    "spectrum", "options")
SHAPE_FIELDS: tuple[str, ...] = ("d_out", "d_in")
FAMILY_FIELDS: tuple[str, ...] = tuple(f for f in IDENTITY_FIELDS if f not in SHAPE_FIELDS)
#: A family without the initializer: the cells drawn together in one view of a chart.
VIEW_FIELDS: tuple[str, ...] = tuple(f for f in FAMILY_FIELDS if f != "initializer")


#: The spectra an init cell's weight can have (``bench.core.weights``; the first is the default).
SPECTRA = ("flat", "spiked")
#: Values a hand-made or old row may leave out (the defaults of ``bench.initcost.tasks.Task``).
DEFAULTS: dict[str, Any] = {"scaling": 1.0, "dtype": "float32", "device": "cpu", "threads": 2, "spectrum": "flat",
                           "options": {}}


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj[name] if name in obj or name not in DEFAULTS else DEFAULTS[name]
    return getattr(obj, name, DEFAULTS[name]) if name in DEFAULTS else getattr(obj, name)


def parse_options(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        return json.loads(value)
    return dict(value)


def identity(obj: Any) -> dict[str, Any]:
    """The identity fields of a task, a measurement or a result row, normalized
    (options as a dict, numbers as their types), so equal cells compare equal."""
    return {
        "initializer": str(_get(obj, "initializer")),
        "d_out": int(_get(obj, "d_out")),
        "d_in": int(_get(obj, "d_in")),
        "rank": int(_get(obj, "rank")),
        "scaling": float(_get(obj, "scaling")),
        "dtype": str(_get(obj, "dtype")),
        "device": str(_get(obj, "device")),
        "threads": int(_get(obj, "threads")),
        "spectrum": str(_get(obj, "spectrum")),
        "options": parse_options(_get(obj, "options")),
    }


def digest(fields: Mapping[str, Any]) -> str:
    """The one key shape every row kind uses: 16 hex digits of the SHA-1 of the fields as
    sorted JSON (values JSON cannot hold are written as their ``str``)."""
    return hashlib.sha1(json.dumps(dict(fields), sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_key(obj: Any) -> str:
    """The :func:`digest` of :func:`identity` (the ``task_key`` of init, history and gate rows).
    The default spectrum (``flat``) is left out of the digest, so a cell keeps the key it
    had before the weight's spectrum became part of the identity."""
    ident = identity(obj)
    if ident["spectrum"] == DEFAULTS["spectrum"]:
        del ident["spectrum"]
    return digest(ident)


def _hashable(ident: dict[str, Any], fields: tuple[str, ...]) -> tuple:
    return tuple(json.dumps(ident[f], sort_keys=True) if f == "options" else ident[f] for f in fields)


def family(obj: Any) -> tuple:
    """The cell without its shape, as a hashable tuple in :data:`FAMILY_FIELDS` order."""
    return _hashable(identity(obj), FAMILY_FIELDS)


def view(obj: Any) -> tuple:
    """The family without the initializer, as a hashable tuple in :data:`VIEW_FIELDS` order."""
    return _hashable(identity(obj), VIEW_FIELDS)


def view_label(obj: Any) -> str:
    """A reader's label of a view: ``cpu · float32 · r=16 · 2 threads`` (+ scaling, options
    where they are not the defaults)."""
    ident = identity(obj)
    parts = [ident["device"], ident["dtype"], f"r={ident['rank']}", f"{ident['threads']} threads"]
    if ident["scaling"] != 1.0:
        parts.append(f"s={ident['scaling']:g}")
    if ident["spectrum"] != DEFAULTS["spectrum"]:
        parts.append(f"{ident['spectrum']} W")
    if ident["options"]:
        parts.append(json.dumps(ident["options"], sort_keys=True))
    return " · ".join(parts)
