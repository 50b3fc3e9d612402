"""The layer-loss verdict: per shape and alignment, and the findings across them.

Per (shape, alignment) configuration the model-level verdict applies unchanged
(``bench.core.paired.verdict_for``): final normalized error per (initializer, lr) with its
95 % CI over seeds, each initializer's best lr, the paired difference to ``noise_zeros``
with Holm-adjusted p, and tied places. Across configurations two findings, each with an
interval, answer the task's two questions:

* **size**: does an initializer's difference to the reference change with the layer?
  The per-seed paired differences at the best lrs, ``d = L(init) − L(ref)``, regressed on
  ``log10(m·n)`` over every (shape, seed): the slope per decade with its Student-t 95 %
  interval (n − 2 degrees of freedom). The magnitude argument predicts a negative slope for
  magnitude-aware inits against noise-zeros (their advantage grows with the layer).
* **alignment**: how the difference depends on where the target lives. Per alignment the
  mean paired difference over every (shape, seed), and the contrast ``d(aligned) − d(random)``
  per (shape, seed) with its interval: PiSSA's "spectral knowledge" claim predicts that its
  edge is larger when the target lies in W's top singular subspace.

Shapes are fixed effects: pooled intervals are over (shape, seed) pairs, so they say how
the difference varies across the measured shapes and seeds, not beyond them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
METRIC = "normalized error"


def layer_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The finished runs (latest row per run), with the columns the loss verdict reads."""
    frame = pd.DataFrame([r for r in rows if r.get("kind") == "layer_loss" and r.get("status") == "ok"])
    if frame.empty:
        return frame
    frame = frame.drop_duplicates("task_key", keep="last").reset_index(drop=True)
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


def config_verdicts(frame: pd.DataFrame, reference: str = LOSS_REFERENCE) -> list[ConfigVerdict]:
    out = []
    for key, group in frame.groupby("config_key", sort=False):
        first = group.iloc[0]
        out.append(ConfigVerdict(key, first["suite_key"], first["shape"], float(first["numel"]), first["alignment"],
                                 verdict_for(group, reference, METRIC)))
    return sorted(out, key=lambda v: (v.suite_key, v.numel, v.shape, v.alignment))


def _best_runs(frame: pd.DataFrame, verdict: LossVerdict) -> dict[str, dict[int, float]]:
    """Per initializer: final error per seed at its best lr in this configuration."""
    out = {}
    for _, row in verdict.best.iterrows():
        g = frame[(frame["config_key"] == verdict.config_key) & (frame["initializer"] == row["initializer"])
                  & (frame["lr"] == row["lr"]) & (frame["diverged_step"].fillna(0) == 0)]
        out[row["initializer"]] = {int(s): float(v) for s, v in zip(g["seed"], g["final_loss"]) if math.isfinite(v)}
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
                              "numel": cv.numel, "initializer": name, "seed": seed, "d": values[seed] - ref[seed]})
    if not diffs:
        return []
    d = pd.DataFrame(diffs)
    out: list[Finding] = []
    for (suite, alignment, name), g in d.groupby(["suite_key", "alignment", "initializer"], sort=True):
        if g["shape"].nunique() < 2:
            continue
        slope, low, high = _slope(np.log10(g["numel"].to_numpy()), g["d"].to_numpy())
        by_shape = g.groupby("numel")["d"].mean()
        finding = Finding("size", suite, name, alignment, slope, low, high, len(g), "")
        if not finding.resolved():
            judgement = "no trend with the layer's size is resolved"
        elif high < 0:
            judgement = f"relatively better than {reference} on larger layers"
        else:
            judgement = f"relatively worse than {reference} on larger layers"
        smallest, largest = by_shape.index.min(), by_shape.index.max()
        finding.text = (f"{name} − {reference}, {alignment} target: {_interval_text(slope, low, high)} {METRIC} per "
                        f"decade of m·n ({g['shape'].nunique()} shapes, {len(g)} shape-seed pairs; mean "
                        f"{by_shape[smallest]:+.3f} at {_shape_of(g, smallest)}, {by_shape[largest]:+.3f} at "
                        f"{_shape_of(g, largest)}): {judgement}.")
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
            finding = Finding("alignment", suite, name, "aligned−random", iv.mean, iv.low, iv.high, iv.n, "")
            if not finding.resolved():
                judgement = "no effect of the alignment is resolved"
            elif iv.high < 0:
                judgement = f"it gains on {reference} when the target lies in W's top singular subspace"
            else:
                judgement = f"it loses ground to {reference} when the target lies in W's top singular subspace"
            finding.text = (f"{name} − {reference} by alignment ({', '.join(parts)}; mean over shapes and seeds): "
                            f"aligned − random {_interval_text(iv.mean, iv.low, iv.high)} over {iv.n} shape-seed "
                            f"pairs: {judgement}.")
            out.append(finding)
    return out


def _shape_of(group: pd.DataFrame, numel: float) -> str:
    return str(group[group["numel"] == numel]["shape"].iloc[0])


@dataclass
class LayerVerdict:
    """Everything the report and the command line print about a layer-loss folder."""

    frame: pd.DataFrame
    configs: list[ConfigVerdict]
    findings: list[Finding]

    def table(self) -> pd.DataFrame:
        parts = []
        for cv in self.configs:
            t = cv.verdict.table.copy()
            t.insert(1, "shape", cv.shape)
            t.insert(2, "alignment", cv.alignment)
            t.insert(3, "numel", cv.numel)
            t["suite_key"] = cv.suite_key
            parts.append(t)
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def layer_verdict(rows: list[dict[str, Any]], reference: str = LOSS_REFERENCE) -> LayerVerdict | None:
    frame = layer_frame(rows)
    if frame.empty:
        return None
    configs = config_verdicts(frame, reference)
    return LayerVerdict(frame, configs, findings(frame, configs, reference))


def write_layer_verdict(rows: list[dict[str, Any]], out: Path, reference: str = LOSS_REFERENCE) -> LayerVerdict | None:
    """``layer_loss_stats.csv`` (per configuration, initializer and lr) and
    ``layer_loss_findings.csv``; the tidy ``layer_loss.csv`` of every run."""
    from bench.core.results import export

    export([{k: v for k, v in r.items() if k not in ("loss", "update_norm", "train_loss", "spec")}
            for r in rows if r.get("kind") == "layer_loss"], Path(out), "layer_loss")
    verdict = layer_verdict(rows, reference)
    if verdict is None:
        return None
    verdict.table().to_csv(Path(out) / STATS_FILE, index=False)
    pd.DataFrame([f.__dict__ for f in verdict.findings]).to_csv(Path(out) / FINDINGS_FILE, index=False)
    return verdict
