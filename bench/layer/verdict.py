"""The layer-loss verdict: per configuration (shape, alignment, target rank and scale), and
the findings across them.

Per configuration the model-level verdict applies unchanged
(``bench.core.paired.verdict_for``): final normalized error per (initializer, lr) with its
95 % CI over the evaluation seeds, each initializer's lr chosen on the selection seeds
(bracketed or provisional), the paired difference to ``noise_zeros`` with Holm-adjusted p,
its minimum detectable effect and equivalence test, and tied places. Each sentence then
says what the design alone decides: an initializer whose **capacity floor**
(``bench.layer.floors``, computed before training) lies above the reference's final error
*cannot reach* it with any lr or number of steps; one whose floor lies below but which
ends above *did not reach* it in T steps (optimization), with the fraction of its possible
progress made. The **magnitude** table compares LoRAM at gain c·β with noise-zeros at the
lr that matches its first-step ‖ΔW_eff‖ (``bench.layer.run.matched_noise_lr``), paired over
the evaluation seeds, and gives Spearman's ρ between update magnitude and final error
within each initializer. Across configurations two findings, each with an interval, answer
the task's two questions:

* **size**: does an initializer's difference to the reference change with the layer?
  The per-seed paired differences at the best lrs, ``d = L(init) − L(ref)``, regressed on
  ``log10(m·n)`` over every (shape, seed): the slope per decade with its Student-t 95 %
  interval (n − 2 degrees of freedom). The magnitude argument predicts a negative slope for
  magnitude-aware inits against noise-zeros (their advantage grows with the layer).
* **alignment**: how the difference depends on where the target lives. Per alignment the
  mean paired difference over every (shape, seed), and the contrast ``d(aligned) − d(random)``
  per (shape, seed) with its interval: PiSSA's "spectral knowledge" claim predicts that its
  edge is larger when the target lies in W's top singular subspace.

Each finding also gives the same statistic of the capacity floors' differences, which the
problem's parameters determine before training: where the two agree, the finding is the
design's, not the initializers' behaviour in training.

Shapes are fixed effects: pooled intervals are over (shape, seed) pairs, so they say how
the difference varies across the measured shapes and seeds, not beyond them; W is one per
shape, so nothing is said about other weights of the same shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sstats

from bench.core.defaults import LOSS_REFERENCE
from bench.core.intervals import Interval, t_quantile
from bench.core.paired import LossVerdict, verdict_for

STATS_FILE = "layer_loss_stats.csv"
FINDINGS_FILE = "layer_loss_findings.csv"
MAGNITUDE_FILE = "layer_loss_magnitude.csv"
PLANE_FILE = "layer_loss_plane.csv"
METRIC = "normalized error"


def layer_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The finished runs (latest row per run), with the columns the loss verdict reads."""
    frame = pd.DataFrame([r for r in rows if r.get("kind") == "layer_loss" and r.get("status") == "ok"])
    if frame.empty:
        return frame
    frame = frame.drop_duplicates("task_key", keep="last").reset_index(drop=True)
    if "spec" in frame:  # rows carry their problem twice: the spec object and spec_ columns
        for key in ("target_rank", "target_scale"):
            column = f"spec_{key}"
            from_spec = frame["spec"].map(lambda v, k=key: v.get(k) if isinstance(v, dict) else None)
            frame[column] = frame[column].fillna(from_spec) if column in frame else from_spec
    for column in ("arm", "stage", "capacity_floor", "progress_fraction", "first_step_update_norm", "plane_key",
                   "spec_target_rank", "spec_target_scale"):
        if column not in frame:
            frame[column] = "" if column in ("arm", "stage", "plane_key") else math.nan
    frame["arm"] = frame["arm"].fillna("").astype(str)
    frame["stage"] = frame["stage"].fillna("selection+evaluation").replace("", "selection+evaluation")
    frame["capacity_floor"] = frame["capacity_floor"].astype(float)
    frame["final_eval_loss"] = frame["final_loss"].astype(float)
    frame["eval_auc"] = frame["auc"].astype(float)
    frame["step0_eval_loss_change"] = frame["step0_loss"].astype(float) - 1.0
    frame["init_seconds"] = frame["init_seconds"].astype(float)
    frame["stats_seconds"] = frame["stats_seconds"].astype(float)
    frame["numel"] = frame["d_out"].astype(float) * frame["d_in"].astype(float)
    frame["shape"] = frame["d_out"].astype(str) + "x" + frame["d_in"].astype(str)
    return frame


@dataclass
class ConfigVerdict:
    """The verdict of one (shape, alignment) configuration."""

    config_key: str
    suite_key: str
    shape: str
    numel: float
    alignment: str
    verdict: LossVerdict
    target_rank: int = 0
    target_scale: float = math.nan


def config_verdicts(frame: pd.DataFrame, reference: str = LOSS_REFERENCE, margin: float | None = None
                    ) -> list[ConfigVerdict]:
    """One verdict per configuration, from its non-magnitude runs, its sentences told where
    the capacity floor decides."""
    out = []
    plain = frame[frame["arm"] == ""]
    for key, group in plain.groupby("config_key", sort=False):
        first = group.iloc[0]
        verdict = verdict_for(group, reference, METRIC, margin=margin)
        _add_floors(verdict, group, reference)
        out.append(ConfigVerdict(key, first["suite_key"], first["shape"], float(first["numel"]), first["alignment"],
                                 verdict, int(first["spec_target_rank"]) if pd.notna(first["spec_target_rank"]) else 0,
                                 float(first["spec_target_scale"])))
    return sorted(out, key=lambda v: (v.suite_key, v.numel, v.shape, v.alignment))


def _add_floors(verdict: LossVerdict, group: pd.DataFrame, reference: str) -> None:
    """Floor columns on the verdict's table and the floor's part in each sentence."""
    table = verdict.table
    scored = group[group["stage"].isin(("evaluation", "selection+evaluation"))]
    floors = scored.groupby(["initializer", "lr"])["capacity_floor"].mean()
    progress = scored.groupby(["initializer", "lr"])["progress_fraction"].apply(
        lambda v: float(np.nanmean(v.astype(float))) if v.notna().any() else math.nan)
    table["capacity_floor_mean"] = [floors.get((r["initializer"], r["lr"]), math.nan) for _, r in table.iterrows()]
    table["progress_fraction_mean"] = [progress.get((r["initializer"], r["lr"]), math.nan) for _, r in table.iterrows()]
    table["reach"] = ""
    best = table[table["is_best_lr"]].set_index("initializer")
    if reference not in best.index:
        return
    ref_final = float(best.loc[reference, "final_eval_mean"])
    ref_floor = float(best.loc[reference, "capacity_floor_mean"])
    for name, row in best.iterrows():
        floor = float(row["capacity_floor_mean"])
        if math.isnan(floor):
            continue
        if name == reference:
            reach = ""
        elif floor > ref_final + 1e-9:
            reach = "cannot reach"
        elif row["final_eval_mean"] > ref_final:
            reach = "did not reach in T steps"
        else:
            reach = "reached"
        table.loc[(table["initializer"] == name) & table["is_best_lr"], "reach"] = reach
        progress_text = ("" if math.isnan(row["progress_fraction_mean"])
                         else f", {100 * row['progress_fraction_mean']:.0f} % of its possible progress made")
        if reach == "cannot reach":
            note = (f" Its capacity floor is {floor:.3f} (computed before training; {reference}'s {ref_floor:.3f}), above "
                    f"{reference}'s final {ref_final:.3f}: no lr or number of steps closes the gap (cannot reach)"
                    f"{progress_text}.")
        elif reach == "did not reach in T steps":
            note = (f" Its capacity floor {floor:.3f} lies below {reference}'s final {ref_final:.3f}: the gap is "
                    f"optimization in T steps, not capacity (did not reach){progress_text}.")
        else:
            note = f" Capacity floor {floor:.3f}{progress_text}."
        verdict.sentences[name] = verdict.sentences.get(name, "") + note


def _best_runs(frame: pd.DataFrame, verdict: LossVerdict) -> dict[str, dict[int, tuple[float, float]]]:
    """Per initializer: (final error, capacity floor) per evaluation seed at its best lr in this configuration."""
    out = {}
    for _, row in verdict.best.iterrows():
        g = frame[(frame["config_key"] == verdict.config_key) & (frame["initializer"] == row["initializer"])
                  & (frame["lr"] == row["lr"]) & (frame["diverged_step"].fillna(0) == 0) & (frame["arm"] == "")
                  & frame["stage"].isin(("evaluation", "selection+evaluation"))]
        out[row["initializer"]] = {int(s): (float(v), float(f)) for s, v, f in
                                   zip(g["seed"], g["final_loss"], g["capacity_floor"]) if math.isfinite(v)}
    return out


@dataclass
class Finding:
    """One answer with its interval: ``estimate`` [``low``, ``high``] over ``n`` points."""

    topic: str  # "size" or "alignment"
    suite_key: str
    initializer: str
    alignment: str
    estimate: float
    low: float
    high: float
    n: int
    text: str

    def resolved(self) -> bool:
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """OLS slope of y on x with its two-sided CONFIDENCE Student-t interval (NaN bounds when n < 3)."""
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        return math.nan, math.nan, math.nan
    fit = sstats.linregress(x, y)
    if n < 3:
        return float(fit.slope), math.nan, math.nan
    half = t_quantile(n - 2) * float(fit.stderr)
    return float(fit.slope), float(fit.slope) - half, float(fit.slope) + half


def _detectable(estimate: float, low: float, high: float, n: int, dof: int) -> str:
    """", it could detect ±X at 80 % power" for an unresolved interval with ``dof`` degrees
    of freedom (the test's standard error is the half-width over its t quantile)."""
    from bench.core.power import _noncentrality

    if math.isnan(low) or dof < 1:
        return ""
    se = (high - low) / 2 / t_quantile(dof)
    return f" (it could detect ±{_noncentrality(dof + 1, 0.05, 0.8) * se:.3f} at 80 % power)"


def _interval_text(estimate: float, low: float, high: float) -> str:
    if math.isnan(low):
        return f"{estimate:+.3f} (no interval)"
    return f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]"


def findings(frame: pd.DataFrame, verdicts: list[ConfigVerdict], reference: str = LOSS_REFERENCE) -> list[Finding]:
    """The size and alignment findings of every suite configuration in ``verdicts``."""
    diffs: list[dict[str, Any]] = []  # per (suite, alignment, shape, initializer, seed)
    for cv in verdicts:
        best = _best_runs(frame, cv.verdict)
        ref = best.get(reference)
        if not ref:
            continue
        for name, values in best.items():
            if name == reference:
                continue
            for seed in sorted(set(values) & set(ref)):
                diffs.append({"suite_key": cv.suite_key, "alignment": cv.alignment, "shape": cv.shape,
                              "numel": cv.numel, "initializer": name, "seed": seed,
                              "d": values[seed][0] - ref[seed][0], "d_floor": values[seed][1] - ref[seed][1]})
    if not diffs:
        return []
    d = pd.DataFrame(diffs)
    out: list[Finding] = []
    for (suite, alignment, name), g in d.groupby(["suite_key", "alignment", "initializer"], sort=True):
        if g["shape"].nunique() < 2:
            continue
        slope, low, high = _slope(np.log10(g["numel"].to_numpy()), g["d"].to_numpy())
        floor_slope = _slope(np.log10(g["numel"].to_numpy()), g["d_floor"].to_numpy())
        by_shape = g.groupby("numel")["d"].mean()
        finding = Finding("size", suite, name, alignment, slope, low, high, len(g), "")
        if not finding.resolved():
            judgement = "no trend with the layer's size is resolved" + _detectable(slope, low, high, len(g), len(g) - 2)
        elif high < 0:
            judgement = f"relatively better than {reference} on larger layers"
        else:
            judgement = f"relatively worse than {reference} on larger layers"
        smallest, largest = by_shape.index.min(), by_shape.index.max()
        finding.text = (f"{name} − {reference}, {alignment} target: {_interval_text(slope, low, high)} {METRIC} per "
                        f"decade of m·n ({g['shape'].nunique()} shapes, {len(g)} shape-seed pairs; mean "
                        f"{by_shape[smallest]:+.3f} at {_shape_of(g, smallest)}, {by_shape[largest]:+.3f} at "
                        f"{_shape_of(g, largest)}): {judgement}. {_floor_text(floor_slope, 'slope', (slope, low, high))}")
        out.append(finding)
    for (suite, name), g in d.groupby(["suite_key", "initializer"], sort=True):
        parts = []
        for alignment, ga in g.groupby("alignment"):
            iv = Interval.of(ga["d"].to_numpy())
            parts.append(f"{alignment} {_interval_text(iv.mean, iv.low, iv.high)}")
        wide = g.pivot_table(index=["shape", "seed"], columns="alignment", values="d")
        if {"aligned", "random"} <= set(wide.columns):
            contrast = (wide["aligned"] - wide["random"]).dropna()
            iv = Interval.of(contrast.to_numpy())
            floors = g.pivot_table(index=["shape", "seed"], columns="alignment", values="d_floor")
            floor_iv = (Interval.of((floors["aligned"] - floors["random"]).dropna().to_numpy())
                        if {"aligned", "random"} <= set(floors.columns) else Interval.of([]))
            finding = Finding("alignment", suite, name, "aligned−random", iv.mean, iv.low, iv.high, iv.n, "")
            if not finding.resolved():
                judgement = "no effect of the alignment is resolved" + _detectable(iv.mean, iv.low, iv.high, iv.n,
                                                                                  iv.n - 1)
            elif iv.high < 0:
                judgement = f"it gains on {reference} when the target lies in W's top singular subspace"
            else:
                judgement = f"it loses ground to {reference} when the target lies in W's top singular subspace"
            finding.text = (f"{name} − {reference} by alignment ({', '.join(parts)}; mean over shapes and seeds): "
                            f"aligned − random {_interval_text(iv.mean, iv.low, iv.high)} over {iv.n} shape-seed "
                            f"pairs: {judgement}. "
                            f"{_floor_text((floor_iv.mean, floor_iv.low, floor_iv.high), 'contrast', (iv.mean, iv.low, iv.high))}")
            out.append(finding)
    return out


def _floor_text(value: tuple[float, float, float], what: str, finding: tuple[float, float, float]) -> str:
    """What the capacity floors alone give for the same statistic (known before training),
    and whether they account for the finding (each interval holds the other's estimate)."""
    estimate, low, high = value
    if math.isnan(estimate):
        return "The capacity floors give no such statistic here."
    f_estimate, f_low, f_high = finding
    accounts = (not math.isnan(low) and low <= f_estimate <= high) or (not math.isnan(f_low) and f_low <= estimate <= f_high)
    judgement = ("the floors account for it: the problem's parameters decide this finding, not training" if accounts
                 else "the floors do not account for it: training, not capacity, makes this finding")
    return (f"The capacity floors' differences alone, computed before any training, give a {what} of "
            f"{_interval_text(estimate, low, high)}: {judgement}.")


def _shape_of(group: pd.DataFrame, numel: float) -> str:
    return str(group[group["numel"] == numel]["shape"].iloc[0])


@dataclass
class LayerVerdict:
    """Everything the report and the command line print about a layer-loss folder."""

    frame: pd.DataFrame
    configs: list[ConfigVerdict]
    findings: list[Finding]
    magnitude: pd.DataFrame = field(default_factory=pd.DataFrame)
    plane: pd.DataFrame = field(default_factory=pd.DataFrame)

    def table(self) -> pd.DataFrame:
        parts = []
        for cv in self.configs:
            t = cv.verdict.table.copy()
            t.insert(1, "shape", cv.shape)
            t.insert(2, "alignment", cv.alignment)
            t.insert(3, "numel", cv.numel)
            t.insert(4, "target_rank", cv.target_rank)
            t.insert(5, "target_scale", cv.target_scale)
            t["suite_key"] = cv.suite_key
            parts.append(t)
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def magnitude_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Loss at matched update magnitude: per configuration, LoRAM arm (gain c) and its
    matched noise-zeros runs, the first-step ‖ΔW_eff‖ of both (the match), the final errors
    and their paired difference over the evaluation seeds with its 95 % CI and p."""
    from bench.core.paired import Paired

    records = []
    matched = frame[frame["arm"].str.startswith("matched to ")]
    for (config_key, arm), g in matched.groupby(["config_key", "arm"], sort=True):
        name, _, gain_text = arm[len("matched to "):].partition(" gain ")
        try:
            gain = float(gain_text)
        except ValueError:  # not an arm this suite wrote: data, not a label to trust
            continue
        if not math.isfinite(gain) or gain <= 0:
            continue
        mine = frame[(frame["config_key"] == config_key) & (frame["initializer"] == name)
                     & (frame["arm"] == ("" if gain == 1.0 else f"gain {gain:g}"))
                     & (frame["stage"] != "selection")]
        if gain == 1.0 and not g.empty:
            mine = mine[mine["lr"] == mine["lr"].mode().iloc[0]] if not mine.empty else mine
        if mine.empty:
            continue
        loram = {int(s): float(v) for s, v in zip(mine["seed"], mine["final_loss"]) if math.isfinite(v)}
        noise = {int(s): float(v) for s, v in zip(g["seed"], g["final_loss"]) if math.isfinite(v)}
        paired = Paired.of(loram, noise)
        records.append({
            "config_key": config_key, "shape": g["shape"].iloc[0], "alignment": g["alignment"].iloc[0],
            "target_rank": int(g["spec_target_rank"].iloc[0]), "target_scale": float(g["spec_target_scale"].iloc[0]),
            "initializer": name, "gain": gain, "lr": float(mine["lr"].iloc[0]), "matched_noise_lr": float(g["lr"].iloc[0]),
            "first_step_norm": float(mine["first_step_update_norm"].astype(float).mean()),
            "matched_first_step_norm": float(g["first_step_update_norm"].astype(float).mean()),
            "final_update_norm": float(mine["final_update_norm"].astype(float).mean()),
            "matched_final_update_norm": float(g["final_update_norm"].astype(float).mean()),
            "loss_mean": float(np.mean(list(loram.values()))) if loram else math.nan,
            "matched_loss_mean": float(np.mean(list(noise.values()))) if noise else math.nan,
            "diff_mean": paired.diff.mean, "diff_ci_low": paired.diff.low, "diff_ci_high": paired.diff.high,
            "p_value": paired.p, "seeds": len(paired.seeds)})
    table = pd.DataFrame(records)
    if table.empty:
        return table
    table["first_step_ratio"] = table["matched_first_step_norm"] / table["first_step_norm"]
    return table


def magnitude_correlations(frame: pd.DataFrame, reference: str = LOSS_REFERENCE) -> pd.DataFrame:
    """Spearman's ρ between final update magnitude and final error *within* each initializer
    over its magnitude-experiment runs (arms and matched lrs), per configuration."""
    records = []
    magnitude_configs = set(frame.loc[frame["stage"] == "magnitude", "config_key"])
    for (config_key, name), g in frame[frame["config_key"].isin(magnitude_configs)
                                       & (frame["stage"] != "selection")].groupby(["config_key", "initializer"]):
        if name == reference:
            g = g[g["arm"].str.startswith("matched to ")]
        g = g[g["final_update_norm"].notna() & g["final_loss"].notna()]
        if len(g) >= 3 and g["final_update_norm"].nunique() > 1 and g["final_loss"].nunique() > 1:
            rho, p = sstats.spearmanr(g["final_update_norm"], g["final_loss"])
        else:
            rho, p = math.nan, math.nan
        records.append({"config_key": config_key, "initializer": name, "runs": len(g), "arms": int(g["arm"].nunique()),
                        "spearman_rho": float(rho), "p_value": float(p)})
    return pd.DataFrame(records)


def plane_table(verdicts: list[ConfigVerdict], frame: pd.DataFrame) -> pd.DataFrame:
    """Per (shape, alignment) plane, target rank, target scale and initializer: the chosen
    lr and its status, the final error, the paired difference to the reference with its CI,
    its MDE, the capacity floor, and the outcome ("wins", "loses", "tie", "equivalent")."""
    from bench.core.intervals import CONFIDENCE

    keys = frame.drop_duplicates("config_key").set_index("config_key")
    records = []
    for cv in verdicts:
        meta = keys.loc[cv.config_key]
        if cv.verdict.best.empty:
            continue
        for _, row in cv.verdict.best.iterrows():
            p = row["best_p_holm"]
            if row["initializer"] == cv.verdict.reference:
                outcome = "reference"
            elif not math.isnan(p) and p < 1 - CONFIDENCE:
                outcome = "wins" if row["best_diff_mean"] < 0 else "loses"
            elif not math.isnan(row.get("best_tost_p", math.nan)) and row["best_tost_p"] < 1 - CONFIDENCE:
                outcome = "equivalent"
            else:
                outcome = "tie"
            records.append({
                "plane_key": meta.get("plane_key", ""), "shape": cv.shape, "alignment": cv.alignment,
                "target_rank": cv.target_rank, "target_scale": cv.target_scale,
                "initializer": row["initializer"], "lr": row["lr"], "lr_status": row["lr_status"],
                "final_eval_mean": row["final_eval_mean"], "best_diff_mean": row["best_diff_mean"],
                "best_diff_ci_low": row["best_diff_ci_low"], "best_diff_ci_high": row["best_diff_ci_high"],
                "best_p_holm": p, "best_mde": row["best_mde"], "capacity_floor_mean": row.get("capacity_floor_mean"),
                "reach": row.get("reach", ""), "outcome": outcome, "seeds": row["seeds"]})
    return pd.DataFrame(records)


def layer_verdict(rows: list[dict[str, Any]], reference: str = LOSS_REFERENCE, margin: float | None = None
                  ) -> LayerVerdict | None:
    frame = layer_frame(rows)
    if frame.empty:
        return None
    if margin is None and "equivalence_margin" in frame:
        values = frame["equivalence_margin"].dropna()
        margin = float(values.iloc[-1]) if not values.empty else None
    configs = config_verdicts(frame, reference, margin)
    magnitude = magnitude_table(frame)
    if not magnitude.empty:
        correlations = magnitude_correlations(frame)
        magnitude = magnitude.merge(correlations[["config_key", "initializer", "spearman_rho", "p_value"]].rename(
            columns={"spearman_rho": "rho_within", "p_value": "rho_p"}), on=["config_key", "initializer"], how="left")
    return LayerVerdict(frame, configs, findings(frame, configs, reference), magnitude, plane_table(configs, frame))


def write_layer_verdict(rows: list[dict[str, Any]], out: Path, reference: str = LOSS_REFERENCE,
                        margin: float | None = None) -> LayerVerdict | None:
    """``layer_loss_stats.csv`` (per configuration, initializer and lr), ``layer_loss_findings.csv``,
    ``layer_loss_plane.csv`` and ``layer_loss_magnitude.csv``; the tidy ``layer_loss.csv`` of every run."""
    from bench.core.results import export

    export([{k: v for k, v in r.items() if k not in ("loss", "update_norm", "train_loss", "spec")}
            for r in rows if r.get("kind") == "layer_loss"], Path(out), "layer_loss")
    verdict = layer_verdict(rows, reference, margin)
    if verdict is None:
        return None
    verdict.table().to_csv(Path(out) / STATS_FILE, index=False)
    pd.DataFrame([f.__dict__ for f in verdict.findings]).to_csv(Path(out) / FINDINGS_FILE, index=False)
    verdict.plane.to_csv(Path(out) / PLANE_FILE, index=False)
    if not verdict.magnitude.empty:
        verdict.magnitude.to_csv(Path(out) / MAGNITUDE_FILE, index=False)
    return verdict
