"""``loram-bench compare BASE NEW``: per cell, NEW/BASE of every gated metric.

Cells are matched by their identity (``bench.core.identity``); which metrics are compared and
how is read from the metric table (``bench.initcost.metrics``):

* a *test*-gated metric (time) is called a regression (*slower*) only when both hold
  (asv's rule): the ratio of medians exceeds ``1 + threshold``
  **and** a two-sided Mann-Whitney U test on the raw values rejects equality at
  ``alpha``. With n and m values the smallest p-value the exact test can reach is
  ``2/C(n+m, n)``; a cell whose samples cannot reach ``alpha`` is *inconclusive*, never a
  regression. (pyperf's compare_to is not used: it mislabels samples of unequal size.)
* a *threshold*-gated metric (peak memory, near-deterministic, one value per cell) is
  flagged when it grows by more than ``memory_threshold`` and more than one MiB (the
  allocator's noise).

This module returns tables and exit codes; the command line prints and reports them.
Exit codes: 0 no regression; 1 a significant slowdown or memory growth; 3 some cell
measured in BASE could not be measured in NEW (crash, timeout, missing), and no
regression; 2 bad input (argparse's convention).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from scipy.stats import mannwhitneyu

from bench.core.identity import IDENTITY_FIELDS
from bench.core.results import OK, read_rows, to_frame
from bench.initcost.metrics import MEMORY_FLOOR_BYTES, REGRESSIONS, Gate, gated

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, EXIT_UNMEASURABLE = 0, 1, 2, 3


@dataclass(frozen=True)
class Thresholds:
    time: float = 0.10
    memory: float = 0.05
    alpha: float = 0.01

    def validate(self) -> None:
        for name, value in (("--threshold", self.time), ("--memory-threshold", self.memory)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"--alpha must be in (0, 1), got {self.alpha}")


def load_init(path: Path) -> pd.DataFrame:
    """The latest init row per cell of a results folder (or an ``init.jsonl``)."""
    path = Path(path)
    file = path / "init.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no init results at {file}")
    frame = to_frame([r for r in read_rows(file) if r.get("kind", "init") == "init"])
    if frame.empty:
        raise ValueError(f"{file} holds no init rows")
    return frame


def min_reachable_p(n: int, m: int) -> float:
    """Smallest two-sided p-value of the exact Mann-Whitney U test with n and m values."""
    return min(1.0, 2.0 / math.comb(n + m, n))


def compare_cell(base: dict[str, Any], new: dict[str, Any] | None, th: Thresholds) -> dict[str, Any]:
    out = {k: base[k] for k in IDENTITY_FIELDS if k in base}
    out["shape"] = f"{base['d_out']}x{base['d_in']}"
    if base.get("status") != OK:
        return {**out, "verdict": "no baseline", "detail": f"baseline {base.get('status')}"}
    if new is None or new.get("status") != OK:
        status = "missing" if new is None else new.get("status")
        return {**out, "verdict": "unmeasurable", "detail": f"new run: {status} {'' if new is None else new.get('reason', '')}"[:200]}
    (time_metric,) = gated(Gate.TEST)
    a, b = list(base[time_metric.field]), list(new[time_metric.field])
    ratio = statistics.median(b) / statistics.median(a)
    reachable = min_reachable_p(len(a), len(b))
    p = float(mannwhitneyu(a, b, alternative="two-sided", method="exact" if len(a) + len(b) <= 40 else "asymptotic").pvalue) \
        if len(a) and len(b) else 1.0
    verdict, detail = "same", ""
    if p < th.alpha and ratio > 1 + th.time:
        verdict = "slower"
    elif p < th.alpha and ratio < 1 / (1 + th.time):
        verdict = "faster"
    elif reachable > th.alpha:
        verdict, detail = "inconclusive", f"{len(a)} vs {len(b)} values cannot reach p < {th.alpha} (min p {reachable:.3g})"
    ratios = {}
    for metric in gated(Gate.THRESHOLD):
        x, y = float(base.get(metric.name) or 0), float(new.get(metric.name) or 0)
        ratios[f"{metric.name.removesuffix('_bytes')}_ratio"] = (y / x) if x else float("nan")
        if y - x > max(MEMORY_FLOOR_BYTES, th.memory * x):
            verdict = "slower, more memory" if verdict == "slower" else "more memory"
            detail = f"{metric.label}: {x / 2**20:.1f} -> {y / 2**20:.1f} MiB"
    return {**out, "verdict": verdict, "time_ratio": ratio, "p_value": p, "base_median_s": statistics.median(a),
            "new_median_s": statistics.median(b), "n_base": len(a), "n_new": len(b),
            "cpu_mem_ratio": ratios.get("peak_cpu_extra_ratio", float("nan")), "detail": detail}


def compare_frames(base: pd.DataFrame, new: pd.DataFrame, th: Thresholds) -> pd.DataFrame:
    new_index = {r["task_key"]: r for r in new.to_dict("records")}
    rows = [compare_cell(b, new_index.get(b["task_key"]), th) for b in base.to_dict("records")]
    return pd.DataFrame(rows)


def compare_folders(base: Path, new: Path, th: Thresholds) -> pd.DataFrame:
    """The comparison table of two results folders (or ``init.jsonl`` files)."""
    th.validate()
    base_frame, new_frame = load_init(base), load_init(new)
    if not set(base_frame["task_key"]) & set(new_frame["task_key"]):
        raise ValueError(f"no common cells: {base} ({len(base_frame)} cells) and {new} ({len(new_frame)} cells) measured "
                         "different initializers, shapes, rank, scaling, dtype, device, threads or options")
    return compare_frames(base_frame, new_frame, th)


def exit_code(comparison: pd.DataFrame) -> int:
    verdicts = set(comparison["verdict"])
    if verdicts & set(REGRESSIONS):
        return EXIT_REGRESSION
    if "unmeasurable" in verdicts:
        return EXIT_UNMEASURABLE
    return EXIT_OK


def summarize(comparison: pd.DataFrame) -> str:
    counts = comparison["verdict"].value_counts().to_dict()
    lines = [f"{len(comparison)} cells: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))]
    flagged = comparison[comparison["verdict"].isin([*REGRESSIONS, "unmeasurable"])]
    for r in flagged.to_dict("records"):
        ratio = r.get("time_ratio")
        ratio_text = f" time x{ratio:.2f} (p={r['p_value']:.2g})" if isinstance(ratio, float) and not math.isnan(ratio) else ""
        lines.append(f"  {r['verdict']:<20} {r['initializer']:<12} {r['shape']:<12} {r['dtype']} {r['device']}{ratio_text} {r.get('detail', '')}")
    ok = comparison.dropna(subset=["time_ratio"]) if "time_ratio" in comparison else comparison.iloc[0:0]
    if not ok.empty:
        geo = math.exp(sum(math.log(x) for x in ok["time_ratio"]) / len(ok))
        lines.append(f"geometric mean of time ratios: {geo:.3f}")
    return "\n".join(lines)


VERDICT_TEXT = {EXIT_OK: "no regression", EXIT_REGRESSION: "REGRESSION", EXIT_UNMEASURABLE: "COULD NOT MEASURE"}
