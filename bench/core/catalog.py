"""The shape catalog of a results folder: preset (or config) → layer shapes and counts.

A run writes it next to its rows (``catalog.json``), for the built-in presets and the
sources it measured, so the report can sum per-shape times into model totals without
instantiating a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.core.results import replace_text
from bench.core.shapes import PRESETS, LayerShape, model_shapes

CATALOG_FILE = "catalog.json"


def build_catalog(sources: list[str]) -> dict[str, list[dict]]:
    """Every shape of each source, with its role and count (meta-device models)."""
    return {str(source): [s.to_dict() for s in model_shapes(source)] for source in sources}


def write_catalog(folder: Path, sources: list[str]) -> Path:
    """Add the built-in presets and ``sources`` to ``folder/catalog.json`` (kept entries stay)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CATALOG_FILE
    catalog = _load(path) if path.is_file() else {}
    wanted = [s for s in dict.fromkeys([*PRESETS, *map(str, sources)]) if s not in catalog]
    catalog.update(build_catalog(wanted))
    replace_text(path, json.dumps(catalog, indent=1, sort_keys=True))
    return path


def _load(path: Path) -> dict[str, list[dict]]:
    """``catalog.json`` as data, checked: an error naming the file and the entry otherwise."""
    fix = "delete it: the next `loram-bench run` into this folder writes it anew"
    try:
        catalog = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(catalog, dict):
        raise ValueError(f"{path} holds a JSON {type(catalog).__name__}, not an object of shape lists; {fix}")
    for name, shapes in catalog.items():
        if not isinstance(shapes, list):
            raise ValueError(f"{path}: entry {name!r} is not a list of shapes; {fix}")
        for i, s in enumerate(shapes):
            ok = (isinstance(s, dict) and set(s) == {"role", "d_out", "d_in", "count"} and isinstance(s["role"], str)
                  and all(isinstance(s[k], int) and not isinstance(s[k], bool) and s[k] >= 1
                          for k in ("d_out", "d_in", "count")))
            if not ok:
                raise ValueError(f"{path}: entry {name!r}, shape {i} is not {{role, d_out, d_in, count}} with positive "
                                 f"integer sizes: {str(s)[:80]}; {fix}")
    return catalog


def read_catalog(folder: Path) -> dict[str, list[LayerShape]]:
    """The catalog of a results folder; empty when the run wrote none."""
    path = Path(folder) / CATALOG_FILE
    if not path.is_file():
        return {}
    return {name: [LayerShape(**s) for s in shapes] for name, shapes in _load(path).items()}
