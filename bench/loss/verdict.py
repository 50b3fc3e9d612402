"""The model-level loss verdict: the paired-seed verdict (``bench.core.paired``) of the
``loss_summary`` rows of each configuration (``config_key``), one row per (initializer, lr,
seed), scored on the final eval loss, and the magnitude relation (Spearman's ρ between
update magnitude and final loss).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.defaults import LOSS_REFERENCE
from bench.core.intervals import CONFIDENCE, Interval
from bench.core.paired import (
    OPTIONAL_COLUMNS,
    LossVerdict,
    Paired,
    holm,
    lr_text,
    magnitude_relation,
    sentence,
    tied_places,
    verdict_for,
)

__all__ = ["CONFIDENCE", "OPTIONAL_COLUMNS", "STATS_FILE", "Interval", "LossVerdict", "Paired", "holm", "lr_text",
           "magnitude_relation", "sentence", "summaries", "tied_places", "verdict_for", "verdicts", "write_verdict"]

STATS_FILE = "loss_stats.csv"


def summaries(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The ``loss_summary`` rows that can enter a verdict (rows of the first release have no lr/seed per run)."""
    frame = pd.DataFrame([r for r in rows if r.get("kind") == "loss_summary"])
    if frame.empty or not {"lr", "seed", "config_key", "final_eval_loss"} <= set(frame.columns):
        return pd.DataFrame()
    return frame.drop_duplicates(["config_key", "initializer", "lr", "seed"], keep="last")


def verdicts(rows: list[dict[str, Any]], reference: str = LOSS_REFERENCE) -> list[LossVerdict]:
    """One verdict per configuration in ``rows``, the most recent configuration first."""
    frame = summaries(rows)
    if frame.empty:
        return []
    stamps = frame["timestamp"] if "timestamp" in frame else pd.Series("", index=frame.index)
    order = stamps.fillna("").astype(str).groupby(frame["config_key"]).max().sort_values(ascending=False).index
    return [verdict_for(frame[frame["config_key"] == key], reference) for key in order]


def write_verdict(rows: list[dict[str, Any]], out: Path, reference: str = LOSS_REFERENCE) -> Path | None:
    """Write every configuration's table to ``out/loss_stats.csv``; None when there is nothing to judge."""
    found = verdicts(rows, reference)
    if not found:
        return None
    path = Path(out) / STATS_FILE
    pd.concat([v.table for v in found], ignore_index=True).to_csv(path, index=False)
    return path
