"""From result rows to the tables the report draws: init cells with extrapolations, cost
laws, speedups over a reference initializer and model-level totals. No plotting here.

Cells are grouped by their family (``bench.core.identity``): one cost law and one line per
initializer and view (device, dtype, rank, threads, scaling, options), so two thread
counts in one folder stay two laws and two lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core import costlaw
from bench.core.catalog import read_catalog
from bench.core.identity import family, view, view_label
from bench.core.paired import LossVerdict
from bench.core.results import read_rows, to_frame
from bench.core.rows import FAILURES, SKIPPED
from bench.core.shapes import LayerShape
from bench.layer.verdict import LayerVerdict, layer_verdict
from loram_ref import INITIALIZERS


@dataclass
class ResultSet:
    init: pd.DataFrame
    loss: pd.DataFrame
    loss_summary: pd.DataFrame
    history: pd.DataFrame
    catalog: dict[str, list[LayerShape]] = field(default_factory=dict)
    #: the verdict over seeds of the loss configuration shown (``bench.loss.verdict``)
    loss_verdict: LossVerdict | None = None
    #: how many other loss configurations the folder holds (not shown; their rows stay in loss.jsonl)
    other_loss_configs: int = 0
    #: the layer-level task's verdict and findings of the latest suite configuration (``bench.layer.verdict``)
    layer: LayerVerdict | None = None
    #: every row of layer_loss.jsonl (failures and skips included), latest per run
    layer_rows: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: how many other layer-loss suite configurations the folder holds (not shown)
    other_layer_configs: int = 0
    #: sharded-init rows (``bench.sharded``), latest per task
    sharded: pd.DataFrame = field(default_factory=pd.DataFrame)


#: The registry's facts the decision summary shows per initializer (``InitializerSpec.facts``).
FACT_COLUMNS = ("needs data", "rewrites W", "decomposition", "cost class", "trains", "PEFT name")


def _load_rows(path: Path) -> list[dict]:
    return read_rows(path) if path.exists() else []


def load_results(results: Path) -> ResultSet:
    """Read ``init.jsonl``, ``loss.jsonl``, ``history.jsonl`` and ``catalog.json`` of a results folder."""
    results = Path(results)
    if results.is_file():
        init_rows, folder = read_rows(results), results.parent
    else:
        init_rows, folder = _load_rows(results / "init.jsonl"), results
    loss_rows = _load_rows(folder / "loss.jsonl")
    init = to_frame([r for r in init_rows if r.get("kind", "init") == "init"])
    if not init.empty:
        init["family"] = [family(r) for r in init.to_dict("records")]
        init["view"] = [view_label(r) for r in init.to_dict("records")]
    loss = pd.DataFrame([r for r in loss_rows if r.get("kind") == "loss"])
    summary = pd.DataFrame([r for r in loss_rows if r.get("kind") == "loss_summary"])
    if not loss.empty and "run_uid" in loss and not summary.empty and "run_uid" in summary:
        # steps of a run count only once its summary was written (a run cut off mid-write is redone)
        finished = set(summary["run_uid"].dropna())
        loss = loss[loss["run_uid"].isna() | loss["run_uid"].isin(finished)]
    for frame in (loss, summary):  # rows written without a per-run lr or seed read as one unknown lr, seed 0
        if not frame.empty:
            for column, default in (("lr", float("nan")), ("seed", 0)):
                if column not in frame:
                    frame[column] = default
    verdict, others = None, 0
    if not summary.empty:  # the latest configuration only: runs are comparable within one
        latest = summary["config_key"].iloc[-1]
        others = summary["config_key"].nunique() - 1
        run = ["initializer", "lr", "seed"]
        summary = summary[summary["config_key"] == latest].drop_duplicates(run, keep="last")
        loss = loss[loss["config_key"] == latest].drop_duplicates([*run, "step"], keep="last")
        if "final_eval_loss" in summary:
            from bench.loss.verdict import verdicts as loss_verdicts

            verdict = loss_verdicts(summary.to_dict("records"))[0]
    history = pd.DataFrame(_load_rows(folder / "history.jsonl"))
    layer, layer_rows, layer_others = _layer(_load_rows(folder / "layer_loss.jsonl"))
    sharded = to_frame([r for r in _load_rows(folder / "sharded.jsonl") if r.get("kind") == "sharded"])
    return ResultSet(init=init, loss=loss, loss_summary=summary, history=history, catalog=read_catalog(folder),
                     loss_verdict=verdict, other_loss_configs=others, layer=layer, layer_rows=layer_rows,
                     other_layer_configs=layer_others, sharded=sharded)


def _layer(rows: list[dict]) -> tuple[LayerVerdict | None, pd.DataFrame, int]:
    """The layer-loss verdict of every configuration of the current design (rows with a
    ``plane_key``; without any, the latest suite configuration), its rows, and how many
    configurations of an older design are not shown."""
    rows = [r for r in rows if r.get("kind") == "layer_loss" and "suite_key" in r]
    if not rows:
        return None, pd.DataFrame(), 0
    current = [r for r in rows if r.get("plane_key")]
    if current:
        shown = current
        others = len({r["suite_key"] for r in rows if not r.get("plane_key")})
    else:
        latest = max(rows, key=lambda r: str(r.get("timestamp", "")))["suite_key"]
        others = len({r["suite_key"] for r in rows}) - 1
        shown = [r for r in rows if r["suite_key"] == latest]
    frame = pd.DataFrame(shown).drop_duplicates("task_key", keep="last").reset_index(drop=True)
    return layer_verdict(shown), frame, others


def _layer_outcomes(layer: LayerVerdict | None) -> dict[str, str]:
    """Per initializer, its layer-task outcomes against the reference over every measured
    configuration (shape, alignment, target rank and scale)."""
    if layer is None or layer.plane.empty:
        return {}
    out = {}
    for name, g in layer.plane[layer.plane["outcome"] != "reference"].groupby("initializer"):
        counts = g["outcome"].value_counts()
        cannot = int((g["reach"] == "cannot reach").sum())
        out[name] = (f"wins {counts.get('wins', 0)}, loses {counts.get('loses', 0)}, as good as "
                     f"{counts.get('equivalent', 0)}, not told apart {counts.get('tie', 0)} of {len(g)} configurations"
                     + (f"; cannot reach the reference (capacity floor) in {cannot}" if cannot else ""))
    return out


def cost_laws(init: pd.DataFrame) -> pd.DataFrame:
    """Per family: the descriptive law ``t = c·x^k`` over the largest sizes, and the
    linear extrapolation law's ``c`` (``bench.core.costlaw``)."""
    out = []
    if init.empty:
        return pd.DataFrame(out)
    ok = init[init["status"] == "ok"]
    for fam, group in ok.groupby("family", sort=False):
        rows = group.to_dict("records")
        name = rows[0]["initializer"]
        law, linear = costlaw.fit_rows(rows, name), costlaw.fit_rows(rows, name, largest=1)
        if law is not None:
            out.append({"initializer": name, "view": rows[0]["view"], "family": fam, "variable": law.variable,
                        "exponent": law.exponent, "coefficient": law.coefficient, "r2": law.r2, "points": law.points,
                        "linear_coefficient": linear.coefficient})
    return pd.DataFrame(out)


def extrapolate(law: dict, initializer: str, d_out: int, d_in: int) -> float:
    """Predicted time of a shape by the linear extrapolation law."""
    return law["linear_coefficient"] * costlaw.size_variable(initializer, d_out, d_in)


def describe(law: dict, initializer: str, d_out: int, d_in: int) -> float:
    """Time of a shape by the descriptive law (the dotted fit of the charts)."""
    return law["coefficient"] * costlaw.size_variable(initializer, d_out, d_in) ** law["exponent"]


def _law_index(laws: pd.DataFrame) -> dict[tuple, dict]:
    return {r["family"]: r for r in laws.to_dict("records")} if not laws.empty else {}


def cells(init: pd.DataFrame, laws: pd.DataFrame) -> pd.DataFrame:
    """Every cell with a time: measured where ok, predicted by its family's cost law where
    the cell was skipped, timed out or crashed."""
    if init.empty:
        return init
    frame = init.copy()
    for column, default in (("role", ""), ("weight_bytes", 0), ("values_s", None), ("peak_cpu_extra_bytes", 0),
                            ("peak_gpu_allocated_bytes", 0), ("peak_gpu_reserved_bytes", 0), ("median_s", None),
                            ("cuda_event_gap", None), ("reason", ""), ("phase", "")):
        if column not in frame:
            frame[column] = default  # rows from older or hand-made files
    frame["extrapolated"] = frame["status"] != "ok"
    frame["failed"] = frame["status"].isin(FAILURES)
    frame["time_s"] = frame["median_s"].astype(float)
    index = _law_index(laws)
    frame["fit_s"] = float("nan")
    for i, row in frame.iterrows():
        law = index.get(row["family"])
        if law is None:
            continue
        frame.at[i, "fit_s"] = describe(law, row["initializer"], row["d_out"], row["d_in"])
        if row["extrapolated"]:
            frame.at[i, "time_s"] = extrapolate(law, row["initializer"], row["d_out"], row["d_in"])
    frame["numel"] = frame["d_out"] * frame["d_in"]
    frame["shape"] = frame["d_out"].astype(str) + "x" + frame["d_in"].astype(str)
    return frame.sort_values(["initializer", "numel"]).reset_index(drop=True)


def speedups(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """``time(reference) / time(initializer)`` per shape and view (> 1: faster than it)."""
    if table.empty or reference not in set(table["initializer"]):
        return pd.DataFrame()
    table = table.assign(view_key=[view(r) for r in table.to_dict("records")])
    ref = table[table["initializer"] == reference][["view_key", "shape", "time_s", "extrapolated"]]
    ref = ref.rename(columns={"time_s": "ref_time_s", "extrapolated": "ref_extrapolated"})
    merged = table.merge(ref, on=["view_key", "shape"])
    merged["speedup"] = merged["ref_time_s"] / merged["time_s"]
    return merged[merged["initializer"] != reference].drop(columns=["view_key"])


def model_totals(table: pd.DataFrame, laws: pd.DataFrame, catalog: dict[str, list[LayerShape]]) -> pd.DataFrame:
    """Whole-model init time per catalog entry: Σ over its shapes of time x count. Shapes
    never measured are predicted by the cost law; ``extrapolated_share`` says how much."""
    if table.empty or laws.empty:
        return pd.DataFrame()
    measured = {(r["family"], r["d_out"], r["d_in"]): r for r in table.to_dict("records") if pd.notna(r.get("time_s"))}
    failed = {(r["family"], r["d_out"], r["d_in"]) for r in table.to_dict("records") if r["status"] in FAILURES}
    out = []
    for preset, shapes in catalog.items():
        for law in laws.to_dict("records"):
            name = law["initializer"]
            total = extrapolated = 0.0
            failed_cells = 0
            for s in shapes:
                failed_cells += (law["family"], s.d_out, s.d_in) in failed
                cell = measured.get((law["family"], s.d_out, s.d_in))
                if cell is not None and not cell["extrapolated"]:
                    t = cell["time_s"]
                else:
                    t = extrapolate(law, name, s.d_out, s.d_in)
                    extrapolated += t * s.count
                total += t * s.count
            out.append({"preset": preset, "initializer": name, "view": law["view"], "total_s": total,
                        "extrapolated_share": extrapolated / total if total else 0.0, "failed_cells": failed_cells,
                        "layers": sum(s.count for s in shapes)})
    return pd.DataFrame(out)


def failures(init: pd.DataFrame) -> pd.DataFrame:
    """Every cell that was not measured: failed (timeout, crash, out of memory, error)
    first, then skipped by prediction, with status, phase and reason."""
    if init.empty:
        return init
    frame = init[init["status"].isin([*FAILURES, SKIPPED])].copy()
    if frame.empty:
        return frame
    frame["shape"] = frame["d_out"].astype(str) + "x" + frame["d_in"].astype(str)
    frame["order"] = (frame["status"] == SKIPPED).astype(int)
    return frame.sort_values(["order", "initializer", "d_out", "d_in"]).drop(columns=["order"]).reset_index(drop=True)


def without_totals(init: pd.DataFrame, laws: pd.DataFrame) -> list[str]:
    """Initializers (per view) with cells but no cost law: no measured cell to fit one, so
    no model total can be given."""
    if init.empty:
        return []
    fitted = set(laws["family"]) if not laws.empty else set()
    missing = init[~init["family"].isin(fitted)]
    return sorted({f"{r['initializer']} ({r['view']})" for r in missing.to_dict("records")})


def decision_summary(data: ResultSet, table: pd.DataFrame, totals: pd.DataFrame) -> pd.DataFrame:
    """One row per initializer: what it costs on each model its cells were measured for (the
    ``preset`` of the rows; else every model with a measured shape), by whole-model init time
    in the main view, the largest peak of one layer's init), what it needs (data) and does
    (rewrites W), whether a sharded version exists, its loss verdict sentence, and how far
    its measured cells are from the hardware floor (the range of ``floor_ratio``).

    Facts of the method come from its registry entry; every figure from the rows (model
    totals as in :func:`model_totals`, a ``~`` share where they rest on predictions)."""
    from loram_ref.sharded import SHARDED

    names: list[str] = []
    for frame in (table, data.loss_summary, data.layer_rows, data.sharded):
        if not frame.empty and "initializer" in frame:
            names += [n for n in frame["initializer"].astype(str).unique() if n not in names]
    if not names:
        return pd.DataFrame()
    main_view = None
    if not totals.empty:
        main_view = totals["view"].value_counts().index[0]
        # the models this folder's cells were measured for (not every preset of the catalog)
        sources = set(table["preset"].dropna().astype(str)) if "preset" in table else set()
        measured = [p for p in totals["preset"].unique() if p in sources]
        if not measured:
            measured = list(totals[totals["extrapolated_share"] < 1.0]["preset"].unique())
        totals = totals[totals["preset"].isin(measured)]
    sentences = data.loss_verdict.sentences if data.loss_verdict is not None else {}
    layer_outcomes = _layer_outcomes(data.layer)
    records = []
    for name in sorted(names):
        spec = INITIALIZERS.get(name)
        facts = spec.facts() if spec else dict.fromkeys(FACT_COLUMNS, "unknown")
        sharded = SHARDED.get(name)
        record: dict[str, Any] = {
            "initializer": name,
            **facts,
            "sharded version": ("gathers W on every rank" if sharded.gathers_weight else "yes") if sharded else "no",
            "loss verdict": sentences.get(name, ""),
            "layer task": layer_outcomes.get(name, ""),
        }
        if not totals.empty:
            mine = totals[(totals["initializer"] == name) & (totals["view"] == main_view)]
            for row in mine.to_dict("records"):
                record[f"init time {row['preset']}"] = row["total_s"]
                record[f"predicted share {row['preset']}"] = row["extrapolated_share"]
                shapes = {(s.d_out, s.d_in) for s in data.catalog.get(row["preset"], [])}
                in_model = pd.Series([(m, n) in shapes for m, n in zip(table["d_out"], table["d_in"])], index=table.index)
                cells_ = table[(table["initializer"] == name) & (table["status"] == "ok") & in_model]
                peak = cells_["peak_cpu_extra_bytes"].max() if not cells_.empty else float("nan")
                record[f"peak memory {row['preset']}"] = peak
        if not table.empty and "floor_ratio" in table:
            ratios = table[(table["initializer"] == name) & (table["status"] == "ok")]["floor_ratio"].dropna()
            record["x floor"] = (float(ratios.min()), float(ratios.max())) if not ratios.empty else None
        records.append(record)
    return pd.DataFrame(records)
