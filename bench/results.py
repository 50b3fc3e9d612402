"""Result rows: one dict per measurement, appended to JSONL as it finishes.

JSONL is the canonical store (append-only, so a crash loses nothing and a rerun skips
what is done); :func:`export` writes the tidy pandas table as CSV and JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

#: Row status values. "ok" rows carry measurements; the others carry a ``reason``.
OK, SKIPPED, TIMEOUT, CRASHED, FAILED = "ok", "skipped", "timeout", "crashed", "failed"


def append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        fh.flush()


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file; a torn last line (a killed writer) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def done_keys(rows: Iterable[dict[str, Any]]) -> set[str]:
    """Task keys already measured or deliberately skipped (failures are retried)."""
    return {r["task_key"] for r in rows if r.get("status") in (OK, SKIPPED) and "task_key" in r}


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    # keep the latest row per task key: a rerun that succeeds replaces an old failure
    if "task_key" in frame.columns:
        frame = frame.drop_duplicates(subset=["task_key"], keep="last")
    return frame.reset_index(drop=True)


def export(rows: list[dict[str, Any]], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem.csv`` and ``stem.json`` (records) of the tidy table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = to_frame(rows)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    flat = frame.copy()
    for col in flat.columns:
        if flat[col].map(lambda v: isinstance(v, (list, dict))).any():
            flat[col] = flat[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    flat.to_csv(csv_path, index=False)
    frame.to_json(json_path, orient="records", indent=1)
    return csv_path, json_path


def export_kind(rows: list[dict[str, Any]], out_dir: Path, kind: str) -> tuple[Path, Path]:
    """:func:`export` the rows of one ``kind`` ("init", "loss", "loss_summary") as ``kind.csv/json``."""
    return export([r for r in rows if r.get("kind") == kind], out_dir, kind)
