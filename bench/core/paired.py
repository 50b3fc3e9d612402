"""Paired-seed verdicts, shared by the loss benchmarks (the model-level runs and the layer
task): which differences between initializers are larger than seed noise.

Input: one row per (initializer, lr, seed) of one configuration (``config_key``). Every
initializer saw the same batch order for a given seed and was scored on the same held-out
data, so comparisons are *paired over seeds*: the difference
``d_s = loss(init, s) − loss(reference, s)`` removes what a seed does to every initializer
alike, and its mean gets a Student-t interval with ``n − 1`` degrees of freedom
(``bench.core.intervals``) and a two-sided p-value (the paired t-test).

Per (initializer, lr): seeds, diverged runs, mean final loss with its 95 % CI, mean area
under the curve, the paired difference to the reference at the same lr (CI, p,
Holm-adjusted p over the table), and the cost (trainable parameters, step-0 loss change,
init and statistics-pass seconds). Per initializer: its best lr, chosen on the *selection*
seeds (lowest mean final loss among lrs where no seed diverged) and bracketed or marked
provisional (``bench.core.brackets``); the paired difference to the reference at *its*
best lr, scored on the separate *evaluation* seeds (where the design has none, on the same
seeds, which flatters the winner: the winner's curse, said in the sentence); the minimum
detectable effect at 80 % power of each test at the Bonferroni level of its family and,
with a declared margin, the equivalence test (``bench.core.power``); and a place in which
initializers not told apart share a place (place = 1 + the number of initializers better
by a paired 95 % interval of the difference wholly below zero; "place", not "rank", which
means the LoRA rank here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
from scipy import stats as sstats

from bench.core.defaults import LOSS_REFERENCE
from bench.core.intervals import CONFIDENCE, Interval

#: summary columns a verdict reads but that rows of an older release may not have
OPTIONAL_COLUMNS = ("diverged_step", "eval_auc", "final_update_norm", "trainable_params", "step0_eval_loss_change",
                    "init_seconds", "stats_seconds", "timestamp")



@dataclass(frozen=True)
class Paired:
    """The mean paired difference ``init − reference`` over common seeds, its CI and p."""

    diff: Interval
    p: float
    seeds: tuple[int, ...]
    sd: float = math.nan  # the standard deviation of the per-seed differences

    @classmethod
    def of(cls, values: dict[int, float], reference: dict[int, float]) -> "Paired":
        seeds = tuple(sorted(set(values) & set(reference)))
        d = np.array([values[s] - reference[s] for s in seeds], dtype=float)
        interval = Interval.of(d)
        if len(d) < 2 or not np.any(d != d[0]):  # one seed, or no spread: no t statistic
            p = math.nan
        else:
            p = float(sstats.ttest_1samp(d, 0.0).pvalue)
        return cls(interval, p, seeds, float(d.std(ddof=1)) if len(d) > 1 else math.nan)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error over the given tests); NaN stays NaN."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    m = len(indexed)
    for k, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - k) * p))
        adjusted[i] = running
    return adjusted


def tied_places(finals: dict[str, dict[int, float]]) -> dict[str, str]:
    """Place initializers by final eval loss, lower is better, from paired intervals.

    ``finals`` maps each initializer to its final eval loss per seed (at its best lr). An
    initializer's place is 1 + the number of others that are better than it with the
    paired difference's 95 % interval wholly below zero; where the interval of a difference
    contains zero the two are not told apart and can share a place ("=2"). Paired
    intervals, not each initializer's own: a seed moves every initializer alike, and that
    shared noise is not a difference between them. With one seed no interval exists: all tie.
    """
    if not finals:
        return {}
    places = {}
    for name, values in finals.items():
        better = 0
        for other, other_values in finals.items():
            if other == name:
                continue
            diff = Paired.of(other_values, values).diff  # other − name
            better += int(not math.isnan(diff.high) and diff.high < 0)
        places[name] = 1 + better
    counts = pd.Series(places).value_counts()
    return {name: (f"={p}" if counts[p] > 1 else str(p)) for name, p in places.items()}


@dataclass
class LossVerdict:
    """The verdict of one configuration: the table and a sentence per initializer."""

    config_key: str
    reference: str
    table: pd.DataFrame  # one row per (initializer, lr)
    sentences: dict[str, str] = field(default_factory=dict)
    magnitude: pd.DataFrame = field(default_factory=pd.DataFrame)  # Spearman ρ(update norm, eval loss), overall and per lr

    @property
    def best(self) -> pd.DataFrame:
        return self.table[self.table["is_best_lr"]].sort_values("final_eval_mean")


def _by_seed(group: pd.DataFrame, column: str) -> dict[int, float]:
    ok = group[group["diverged_step"].fillna(0) == 0]
    return {int(s): float(v) for s, v in zip(ok["seed"], ok[column]) if math.isfinite(v)}


#: Stages a row can belong to: the lr is chosen on selection seeds and the verdict scored on
#: evaluation seeds; a row of both ("selection+evaluation") is a design without separate
#: selection seeds (the quick suite's), whose best lr is flattered by the winner's curse.
SELECTION, EVALUATION, BOTH = "selection", "evaluation", "selection+evaluation"


def _stage(summary: pd.DataFrame) -> pd.Series:
    if "stage" not in summary:
        return pd.Series(BOTH, index=summary.index)
    return summary["stage"].fillna(BOTH).astype(str)


def _grid(summary: pd.DataFrame) -> list[float]:
    """The starting lr grid the rows record (``lr_grid``); without it, every lr run."""
    import json

    if "lr_grid" in summary:
        for value in summary["lr_grid"].dropna():
            try:
                grid = [float(v) for v in (json.loads(value) if isinstance(value, str) else value)]
            except (TypeError, ValueError):
                continue
            if grid:
                return grid
    return sorted(float(v) for v in summary["lr"].unique())


def verdict_for(summary: pd.DataFrame, reference: str = LOSS_REFERENCE, metric: str = "eval loss",
                margin: float | None = None) -> LossVerdict:
    """The verdict of one configuration's ``loss_summary`` rows (one ``config_key``);
    ``metric`` names what ``final_eval_loss`` holds in the sentences, ``margin`` the
    equivalence margin of "as good as" claims (TOST; none: no equivalence claims).

    Each initializer's lr is chosen on its selection rows (``bench.core.brackets``: bracketed
    or provisional), and every comparison is scored on the evaluation rows at the chosen lrs."""
    from bench.core.brackets import choose_lr
    from bench.core.power import mde, tost_p

    keys = summary["config_key"].unique()
    if len(keys) != 1:
        raise ValueError(f"verdict_for needs the rows of one configuration, got {len(keys)} config keys")
    summary = summary.copy()
    for column in OPTIONAL_COLUMNS:  # rows of older releases lack some; they read as unknown
        if column not in summary:
            summary[column] = math.nan
    summary["diverged_step"] = summary["diverged_step"].fillna(0)
    summary["_stage"] = _stage(summary)
    separate = bool((summary["_stage"] == SELECTION).any())
    selecting = summary[summary["_stage"].isin((SELECTION, BOTH))]
    scoring = summary[summary["_stage"].isin((EVALUATION, BOTH))]
    if selecting.empty:  # rows that name no selection stage: chosen on the scored seeds
        selecting = scoring
    grid = _grid(summary)
    has_reference = reference in set(summary["initializer"])
    records: list[dict[str, Any]] = []
    final: dict[tuple[str, float], dict[int, float]] = {}
    for (name, lr), g in summary.groupby(["initializer", "lr"], sort=True):
        scored = scoring[(scoring["initializer"] == name) & (scoring["lr"] == lr)]
        chosen_from = selecting[(selecting["initializer"] == name) & (selecting["lr"] == lr)]
        final[(name, lr)] = _by_seed(scored, "final_eval_loss")
        loss = Interval.of(list(final[(name, lr)].values()))
        auc = Interval.of(list(_by_seed(scored, "eval_auc").values()))
        sel = _by_seed(chosen_from, "final_eval_loss")
        sel_diverged = int((chosen_from["diverged_step"] > 0).sum())
        record = {
            "config_key": keys[0], "initializer": name, "lr": float(lr), "seeds": int(scored["seed"].nunique()),
            "diverged": int((scored["diverged_step"] > 0).sum()),
            "selection_seeds": int(chosen_from["seed"].nunique()),
            "selection_mean": (float(np.mean(list(sel.values()))) if sel and not sel_diverged else math.nan),
            "selection_diverged": sel_diverged,
            "final_eval_mean": loss.mean, "final_eval_ci_low": loss.low, "final_eval_ci_high": loss.high,
            "eval_auc_mean": auc.mean, "eval_auc_ci_low": auc.low, "eval_auc_ci_high": auc.high,
            "final_update_norm_mean": float(g["final_update_norm"].mean()),
            "trainable_params": float(g["trainable_params"].median()),
            "step0_eval_loss_change": float(g["step0_eval_loss_change"].mean()),
            "init_seconds": float(g["init_seconds"].median()),
            "stats_seconds": float(g["stats_seconds"].median()),
            "reference": reference if has_reference else "",
        }
        records.append(record)
    table = pd.DataFrame(records)
    # the paired difference to the reference at the same lr (on the scoring seeds)
    for column in ("diff_mean", "diff_ci_low", "diff_ci_high", "p_value", "paired_seeds", "p_holm", "diff_mde"):
        table[column] = 0 if column == "paired_seeds" else math.nan
    same_lr = _paired_to_reference(table, table.index, final, reference, lambda row: final.get((reference, row["lr"])))
    for i, paired in same_lr.items():
        table.loc[i, "paired_seeds"] = len(paired.seeds)
        table.loc[i, "diff_mde"] = mde(paired.sd, len(paired.seeds), tests=max(1, len(same_lr)))
    # the chosen lr per initializer, from the selection rows (bracketed or provisional)
    table["is_best_lr"] = False
    table["lr_status"] = ""
    table["selected_on_scored_seeds"] = not separate
    best_lr: dict[str, float] = {}
    for name, g in table.groupby("initializer"):
        means = {float(r["lr"]): (r["selection_mean"] if r["selection_seeds"] else math.nan)
                 for _, r in g.iterrows() if r["selection_seeds"]}
        choice = choose_lr(means, grid)
        table.loc[g.index, "lr_status"] = choice.status
        if choice.lr is not None:
            idx = g.index[g["lr"] == choice.lr][0]
            table.loc[idx, "is_best_lr"] = True
            best_lr[name] = choice.lr
    # at the chosen lrs: paired difference to the reference at its own, power, equivalence, places
    for column in ("best_diff_mean", "best_diff_ci_low", "best_diff_ci_high", "best_p_value", "best_p_holm",
                   "best_mde", "best_tost_p"):
        table[column] = math.nan
    table["equivalence_margin"] = math.nan if margin is None else float(margin)
    table["place"] = ""
    ref_best = final.get((reference, best_lr[reference])) if reference in best_lr else None
    best_rows = table[table["is_best_lr"]]
    at_chosen = _paired_to_reference(table, best_rows.index, final, reference, lambda row: ref_best, prefix="best_")
    for i, paired in at_chosen.items():
        n = len(paired.seeds)
        table.loc[i, "best_mde"] = mde(paired.sd, n, tests=max(1, len(at_chosen)))
        if margin is not None:
            table.loc[i, "best_tost_p"] = tost_p(paired.diff.mean, paired.sd, n, margin)
    at_best = {row["initializer"]: final[(row["initializer"], row["lr"])] for _, row in best_rows.iterrows()}
    for name, place in tied_places(at_best).items():
        table.loc[(table["initializer"] == name) & table["is_best_lr"], "place"] = place
    verdict = LossVerdict(config_key=keys[0], reference=reference if has_reference else "", table=table)
    verdict.sentences = {name: sentence(table, name, reference, metric) for name in sorted(table["initializer"].unique())}
    verdict.magnitude = magnitude_relation(summary[summary["_stage"].isin((EVALUATION, BOTH))])
    return verdict


def _paired_to_reference(table: pd.DataFrame, rows: pd.Index, final: dict[tuple[str, float], dict[int, float]],
                         reference: str, reference_runs: Callable[[pd.Series], dict[int, float] | None],
                         prefix: str = "") -> dict[Any, Paired]:
    """For each row of ``rows`` but the reference's own: the paired difference of its runs to
    ``reference_runs(row)`` (none: no comparison) into ``{prefix}diff_mean``, ``_ci_low``,
    ``_ci_high`` and ``{prefix}p_value``, and the Holm adjustment over those rows into
    ``{prefix}p_holm``. Returns the comparisons by row index."""
    found: dict[Any, Paired] = {}
    for i in rows:
        row = table.loc[i]
        ref = reference_runs(row)
        if not ref or row["initializer"] == reference:
            continue
        paired = Paired.of(final[(row["initializer"], row["lr"])], ref)
        table.loc[i, [f"{prefix}diff_mean", f"{prefix}diff_ci_low", f"{prefix}diff_ci_high", f"{prefix}p_value"]] = (
            paired.diff.mean, paired.diff.low, paired.diff.high, paired.p)
        found[i] = paired
    for i, p in zip(found, holm([paired.p for paired in found.values()])):
        table.loc[i, f"{prefix}p_holm"] = p
    return found


def lr_text(value: float) -> str:
    """A learning rate as people write it: 3e-4, 1.5e-3 (no precision lost, no padding)."""
    if not math.isfinite(value):
        return str(value)
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def sentence(table: pd.DataFrame, name: str, reference: str, metric: str = "eval loss") -> str:
    """One plain sentence: how ``name`` at its chosen lr compares with the reference at its
    own, with what the comparison could have detected and whether its lrs are bracketed."""
    rows = table[(table["initializer"] == name) & table["is_best_lr"]]
    if rows.empty:
        return f"{name}: every learning rate tried diverged on at least one seed; no verdict."
    row = rows.iloc[0]
    init = "init time not measured" if math.isnan(row["init_seconds"]) else f"{row['init_seconds']:.2f} s init"
    cost = init + (f" + {row['stats_seconds']:.1f} s statistics pass" if row["stats_seconds"] > 0 else "")
    seeds = f"{int(row['seeds'])} seed{'s' if row['seeds'] != 1 else ''}"
    selection = (" (lr chosen on the same seeds)" if row.get("selected_on_scored_seeds", True)
                 else f" (lr chosen on {int(row['selection_seeds'])} other seeds)")
    lr_note = "" if row.get("lr_status", "") in ("", "bracketed") else f" [{row['lr_status']}]"
    head = (f"{name} (place {row['place']}): {metric} {row['final_eval_mean']:.3f} at its best lr "
            f"{lr_text(row['lr'])}{lr_note}")
    if name == reference:
        return f"{head}, {seeds}{selection}; the reference; {cost}."
    if math.isnan(row["best_diff_mean"]):
        why = "no reference runs" if not reference or not table["initializer"].eq(reference).any() else "no common seeds"
        return f"{head}, {seeds}; no paired comparison ({why}); {cost}."
    ref = table[(table["initializer"] == reference) & table["is_best_lr"]].iloc[0]
    ref_note = "" if ref.get("lr_status", "") in ("", "bracketed") else f" [{ref['lr_status']}]"
    diff = f"{row['best_diff_mean']:+.3f}"
    if math.isnan(row["best_diff_ci_low"]):
        return (f"{head}: {diff} vs {reference} (at {lr_text(ref['lr'])}) on one seed: no interval, no verdict; {cost}.")
    half = (row["best_diff_ci_high"] - row["best_diff_ci_low"]) / 2
    p = row["best_p_holm"]
    # resolved: Holm-adjusted p below 1 − CONFIDENCE (the CI where no p exists: no spread)
    resolved = p < 1 - CONFIDENCE if not math.isnan(p) else (row["best_diff_ci_high"] < 0 or row["best_diff_ci_low"] > 0)
    margin = row.get("equivalence_margin", math.nan)
    tost = row.get("best_tost_p", math.nan)
    if resolved:
        judgement = ("better than" if row["best_diff_mean"] < 0 else "worse than") + f" {reference}"
    elif not math.isnan(tost) and tost < 1 - CONFIDENCE:
        judgement = f"as good as {reference} within ±{margin:g} (equivalence test p = {tost:.2g})"
    else:
        mde_text = "" if math.isnan(row["best_mde"]) else f"; it could detect ±{row['best_mde']:.3f} at 80 % power"
        tost_text = "" if math.isnan(tost) else f", and equivalence within ±{margin:g} is not shown (p = {tost:.2g})"
        judgement = f"not distinguishable from {reference}{mde_text}{tost_text}"
    provisional = " Provisional: an lr at the edge of the grid." if lr_note or ref_note else ""
    return (f"{head}: {diff} ± {half:.3f} {metric} vs {reference} at its best lr {lr_text(ref['lr'])}{ref_note}, "
            f"p = {p:.2g} (Holm), {seeds}{selection}: {judgement}; {cost}.{provisional}")


def magnitude_relation(summary: pd.DataFrame) -> pd.DataFrame:
    """Spearman's ρ between the final update magnitude Σ‖ΔW‖_F and the final eval loss over
    all finished runs, within each lr, and within each initializer (across its lrs and seeds).
    A description, not a test of the LoRAM paper's claim that magnitude drives the loss: runs
    of different initializers and seeds are pooled (their effective number is far smaller
    than the runs), and a correlation says nothing of cause; the layer task's magnitude arms
    test the claim by intervention (``bench.layer.verdict.magnitude_table``)."""
    ok = summary[(summary["diverged_step"] == 0) & summary["final_eval_loss"].notna() & summary["final_update_norm"].notna()]
    groups = ([("all", ok)] + [(lr_text(lr), g) for lr, g in ok.groupby("lr")]
              + [(f"within {name}", g) for name, g in ok.groupby("initializer")])
    records = []
    for label, g in groups:
        if len(g) >= 3 and g["final_update_norm"].nunique() > 1 and g["final_eval_loss"].nunique() > 1:
            rho, p = sstats.spearmanr(g["final_update_norm"], g["final_eval_loss"])
            records.append({"lr": label, "runs": len(g), "spearman_rho": float(rho), "p_value": float(p)})
        else:
            records.append({"lr": label, "runs": len(g), "spearman_rho": math.nan, "p_value": math.nan})
    return pd.DataFrame(records)
