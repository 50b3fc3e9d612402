"""From result rows to the tables the report draws: init cells with extrapolations, cost
laws, speedups over full-SVD PiSSA and model-level totals. No plotting here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench import costlaw
from bench.results import read_rows, to_frame

GROUP = ["device", "dtype", "rank"]


@dataclass
class ResultSet:
    init: pd.DataFrame
    loss: pd.DataFrame
    loss_summary: pd.DataFrame
    history: pd.DataFrame


def _load_rows(path: Path) -> list[dict]:
    return read_rows(path) if path.exists() else []


def load_results(results: Path) -> ResultSet:
    """Read ``init.jsonl``, ``loss.jsonl`` and ``history.jsonl`` of a results folder."""
    results = Path(results)
    if results.is_file():
        init_rows, folder = read_rows(results), results.parent
    else:
        init_rows, folder = _load_rows(results / "init.jsonl"), results
    loss_rows = _load_rows(folder / "loss.jsonl")
    init = to_frame([r for r in init_rows if r.get("kind", "init") == "init"])
    loss = pd.DataFrame([r for r in loss_rows if r.get("kind") == "loss"])
    summary = pd.DataFrame([r for r in loss_rows if r.get("kind") == "loss_summary"])
    if not summary.empty:  # the latest configuration only: curves are comparable within one
        latest = summary["config_key"].iloc[-1]
        summary = summary[summary["config_key"] == latest].drop_duplicates("initializer", keep="last")
        loss = loss[loss["config_key"] == latest].drop_duplicates(["initializer", "step"], keep="last")
    history = pd.DataFrame(_load_rows(folder / "history.jsonl"))
    return ResultSet(init=init, loss=loss, loss_summary=summary, history=history)


def cost_laws(init: pd.DataFrame) -> pd.DataFrame:
    """Per (initializer, device, dtype, rank): the descriptive law ``t = c·x^k`` over the
    largest sizes, and the linear extrapolation law's ``c`` (``bench.costlaw``)."""
    out = []
    if init.empty:
        return pd.DataFrame(out)
    ok = init[init["status"] == "ok"]
    for (name, device, dtype, rank), group in ok.groupby(["initializer", *GROUP]):
        rows = group.to_dict("records")
        law, linear = costlaw.fit_rows(rows, name), costlaw.fit_rows(rows, name, largest=1)
        if law is not None:
            out.append({"initializer": name, "device": device, "dtype": dtype, "rank": rank, "variable": law.variable,
                        "exponent": law.exponent, "coefficient": law.coefficient, "r2": law.r2, "points": law.points,
                        "linear_coefficient": linear.coefficient})
    return pd.DataFrame(out)


def extrapolate(law: dict, initializer: str, d_out: int, d_in: int) -> float:
    """Predicted time of a shape by the linear extrapolation law."""
    return law["linear_coefficient"] * costlaw.size_variable(initializer, d_out, d_in)


def cells(init: pd.DataFrame, laws: pd.DataFrame) -> pd.DataFrame:
    """Every (initializer, shape, device, dtype, rank) cell with a time: measured where ok,
    predicted by its cost law where the cell was skipped, timed out or crashed."""
    if init.empty:
        return init
    frame = init.copy()
    for column, default in (("role", ""), ("weight_bytes", 0), ("values_s", None), ("peak_cpu_extra_bytes", 0),
                            ("peak_gpu_allocated_bytes", 0), ("peak_gpu_reserved_bytes", 0), ("median_s", None)):
        if column not in frame:
            frame[column] = default  # rows from older or hand-made files
    frame["extrapolated"] = frame["status"] != "ok"
    frame["time_s"] = frame["median_s"].astype(float)
    law_index = {tuple(r[k] for k in ["initializer", *GROUP]): r for r in laws.to_dict("records")} if not laws.empty else {}
    for i, row in frame[frame["extrapolated"]].iterrows():
        law = law_index.get((row["initializer"], row["device"], row["dtype"], row["rank"]))
        if law is not None:
            frame.at[i, "time_s"] = extrapolate(law, row["initializer"], row["d_out"], row["d_in"])
    frame["numel"] = frame["d_out"] * frame["d_in"]
    frame["shape"] = frame["d_out"].astype(str) + "x" + frame["d_in"].astype(str)
    return frame.sort_values(["initializer", "numel"]).reset_index(drop=True)


def speedups(table: pd.DataFrame, reference: str = "pissa") -> pd.DataFrame:
    """``time(reference) / time(initializer)`` per shape and group (> 1: faster than it)."""
    if table.empty or reference not in set(table["initializer"]):
        return pd.DataFrame()
    ref = table[table["initializer"] == reference][[*GROUP, "shape", "time_s", "extrapolated"]]
    ref = ref.rename(columns={"time_s": "ref_time_s", "extrapolated": "ref_extrapolated"})
    merged = table.merge(ref, on=[*GROUP, "shape"])
    merged["speedup"] = merged["ref_time_s"] / merged["time_s"]
    return merged[merged["initializer"] != reference]


def model_totals(table: pd.DataFrame, laws: pd.DataFrame, presets: list[str]) -> pd.DataFrame:
    """Whole-model init time per preset: Σ over its shapes of time x count. Shapes never
    measured are predicted by the cost law; ``extrapolated_share`` says how much."""
    from bench.shapes import model_shapes

    if table.empty:
        return pd.DataFrame()
    law_index = {tuple(r[k] for k in ["initializer", *GROUP]): r for r in laws.to_dict("records")} if not laws.empty else {}
    measured = {(r["initializer"], r["device"], r["dtype"], r["rank"], r["d_out"], r["d_in"]): r
                for r in table.to_dict("records") if pd.notna(r.get("time_s"))}
    out = []
    for preset in presets:
        shapes = model_shapes(preset)
        for key, law in law_index.items():
            total = extrapolated = 0.0
            for s in shapes:
                cell = measured.get((*key, s.d_out, s.d_in))
                if cell is not None and not cell["extrapolated"]:
                    t = cell["time_s"]
                else:
                    t = extrapolate(law, key[0], s.d_out, s.d_in)
                    extrapolated += t * s.count
                total += t * s.count
            out.append({"preset": preset, "initializer": key[0], "device": key[1], "dtype": key[2], "rank": key[3],
                        "total_s": total, "extrapolated_share": extrapolated / total if total else 0.0,
                        "layers": sum(s.count for s in shapes)})
    return pd.DataFrame(out)
