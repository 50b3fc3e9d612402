"""The model-level loss verdict: the paired-seed verdict (``bench.core.paired``) of the
``loss_summary`` rows of each configuration (``config_key``), one row per (initializer, lr,
seed), scored on the final eval loss, and the magnitude relation (Spearman's ρ between
update magnitude and final loss).

The eval set is a sample too. Where the rows carry the final loss of every held-out block
(``final_eval_blocks``), the difference at the chosen lrs gets its standard error from a
**crossed bootstrap**: ``d[s, b] = L_init(s, b) − L_ref(s, b)`` over evaluation seeds s and
eval blocks b (every run is scored on the same blocks), resampling seeds and blocks
independently, so the error holds the seed noise *and* the eval set's sampling error. The
bootstrap SE, scaled by ``√(S/(S−1))`` (a bootstrap over S seeds shrinks the seed variance
by ``(S−1)/S``), then enters the same Student-t machinery as everywhere else (S − 1
degrees of freedom): interval, two-sided p (Holm-adjusted over the table), MDE and the
equivalence test replace the seeds-only t-test's; the table says which it used
(``interval_method``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
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


#: Bootstrap resamples of the crossed (seed x eval block) design (the SE's Monte Carlo error ~1 %).
BOOTSTRAP_RESAMPLES = 4000


def verdicts(rows: list[dict[str, Any]], reference: str = LOSS_REFERENCE) -> list[LossVerdict]:
    """One verdict per configuration in ``rows``, the most recent configuration first."""
    frame = summaries(rows)
    if frame.empty:
        return []
    stamps = frame["timestamp"] if "timestamp" in frame else pd.Series("", index=frame.index)
    order = stamps.fillna("").astype(str).groupby(frame["config_key"]).max().sort_values(ascending=False).index
    out = []
    for key in order:
        group = frame[frame["config_key"] == key]
        margin = None
        if "equivalence_margin" in group and group["equivalence_margin"].notna().any():
            margin = float(group["equivalence_margin"].dropna().iloc[-1])
        verdict = verdict_for(group, reference, margin=margin)
        with_eval_sampling(verdict, group, reference)
        out.append(verdict)
    return out


def _blocks(group: pd.DataFrame) -> dict[tuple[str, float, int], np.ndarray]:
    """The final per-block eval losses of each scored (initializer, lr, seed)."""
    from bench.core.paired import BOTH, EVALUATION

    out = {}
    if "final_eval_blocks" not in group:
        return out
    stage = group["stage"].fillna(BOTH) if "stage" in group else pd.Series(BOTH, index=group.index)
    for (_, row), st in zip(group.iterrows(), stage):
        blocks = row["final_eval_blocks"]
        if st in (EVALUATION, BOTH) and isinstance(blocks, list) and blocks and not row.get("diverged_step"):
            out[(row["initializer"], float(row["lr"]), int(row["seed"]))] = np.asarray(blocks, dtype=float)
    return out


def crossed_bootstrap_se(d: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """The standard error of the mean of ``d`` (seeds x blocks), seeds and blocks resampled
    independently, scaled by ``√(S/(S−1))`` for the S seeds (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n_seeds, n_blocks = d.shape
    rows = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    cols = rng.integers(0, n_blocks, size=(resamples, n_blocks))
    # the grand mean of a resample: the mean over resampled seeds of the resampled blocks
    draws = d[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2))
    return float(draws.std(ddof=1)) * math.sqrt(n_seeds / (n_seeds - 1))


def with_eval_sampling(verdict: LossVerdict, group: pd.DataFrame, reference: str = LOSS_REFERENCE) -> None:
    """Replace the chosen-lr comparisons' t-intervals by the crossed bootstrap's where the
    rows have per-block eval losses (module docstring), and rewrite the sentences."""
    from scipy import stats as sstats

    from bench.core.intervals import t_quantile
    from bench.core.paired import holm, sentence
    from bench.core.power import _noncentrality, tost_p

    blocks = _blocks(group)
    table = verdict.table
    table["interval_method"] = "t over seeds"
    best = table[table["is_best_lr"]]
    ref = best[best["initializer"] == reference]
    if not blocks or ref.empty:
        return
    ref_lr = float(ref["lr"].iloc[0])
    found = {}
    for i, row in best.iterrows():
        if row["initializer"] == reference:
            continue
        seeds = sorted(s for (n, lr, s) in blocks if n == row["initializer"] and lr == row["lr"]
                       and (reference, ref_lr, s) in blocks)
        lengths = {len(blocks[(row["initializer"], row["lr"], s)]) for s in seeds} | {
            len(blocks[(reference, ref_lr, s)]) for s in seeds}
        if len(seeds) < 2 or len(lengths) != 1:
            continue
        d = np.stack([blocks[(row["initializer"], row["lr"], s)] - blocks[(reference, ref_lr, s)] for s in seeds])
        found[i] = (float(d.mean()), crossed_bootstrap_se(d), d.shape)
    if not found:
        return
    p_values = {}
    for i, (mean, se, (n, _)) in found.items():
        p_values[i] = (float(2 * sstats.t.sf(abs(mean) / se, n - 1)) if se > 0 else (0.0 if mean != 0 else 1.0))
    adjusted = dict(zip(p_values, holm(list(p_values.values()))))
    margin = float(table["equivalence_margin"].iloc[0]) if "equivalence_margin" in table else math.nan
    for i, (mean, se, (n, n_blocks)) in found.items():
        half = t_quantile(n - 1) * se
        table.loc[i, ["best_diff_mean", "best_diff_ci_low", "best_diff_ci_high", "best_p_value", "best_p_holm"]] = (
            mean, mean - half, mean + half, p_values[i], adjusted[i])
        table.loc[i, "best_mde"] = _noncentrality(n, 0.05 / len(found), 0.8) * se
        if math.isfinite(margin):
            table.loc[i, "best_tost_p"] = tost_p(mean, se * math.sqrt(n), n, margin)
        table.loc[i, "interval_method"] = f"t with the crossed bootstrap SE over {n} seeds x {n_blocks} eval blocks"
    verdict.sentences = {name: sentence(table, name, reference) for name in sorted(table["initializer"].unique())}


def write_verdict(rows: list[dict[str, Any]], out: Path, reference: str = LOSS_REFERENCE) -> Path | None:
    """Write every configuration's table to ``out/loss_stats.csv``; None when there is nothing to judge."""
    found = verdicts(rows, reference)
    if not found:
        return None
    path = Path(out) / STATS_FILE
    pd.concat([v.table for v in found], ignore_index=True).to_csv(path, index=False)
    return path
