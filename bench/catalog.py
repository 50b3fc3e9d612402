"""The shape catalog of a results folder: preset (or config) → layer shapes and counts.

A run writes it next to its rows (``catalog.json``), for the built-in presets and the
sources it measured, so the report can sum per-shape times into model totals without
instantiating a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from .shapes import PRESETS, LayerShape, model_shapes

CATALOG_FILE = "catalog.json"


def build_catalog(sources: list[str]) -> dict[str, list[dict]]:
    """Every shape of each source, with its role and count (meta-device models)."""
    return {str(source): [s.to_dict() for s in model_shapes(source)] for source in sources}


def write_catalog(folder: Path, sources: list[str]) -> Path:
    """Add the built-in presets and ``sources`` to ``folder/catalog.json`` (kept entries stay)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CATALOG_FILE
    catalog = json.loads(path.read_text()) if path.is_file() else {}
    wanted = [s for s in dict.fromkeys([*PRESETS, *map(str, sources)]) if s not in catalog]
    catalog.update(build_catalog(wanted))
    path.write_text(json.dumps(catalog, indent=1, sort_keys=True))
    return path


def read_catalog(folder: Path) -> dict[str, list[LayerShape]]:
    """The catalog of a results folder; empty when the run wrote none."""
    path = Path(folder) / CATALOG_FILE
    if not path.is_file():
        return {}
    return {name: [LayerShape(**s) for s in shapes] for name, shapes in json.loads(path.read_text()).items()}
