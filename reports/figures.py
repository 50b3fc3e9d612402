"""Plotly figures of the report. Each takes tidy tables (``reports.tables``) and returns a
``go.Figure``; views that a reader picks (device · dtype, preset) are a dropdown that
toggles trace visibility, so the page needs no server.

Conventions shared by every chart: one colour per initializer (:func:`color`, from the
registry's order, the same in every chart); layer shapes on a category axis ordered by
m·n, so 4096x11008 and 11008x4096 are two positions; measured points filled, points
predicted by a cost law hollow, failed cells a cross at their predicted time; a grey
key in the legend says so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from loram_ref import INITIALIZERS

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
BYTES_MIB = 1 << 20
KEY = "#888888"


def color(name: str) -> str:
    """The one colour of an initializer in every chart (registry order; others after it)."""
    order = sorted(INITIALIZERS)
    index = order.index(name) if name in order else len(order) + sum(map(ord, name))
    return PALETTE[index % len(PALETTE)]


def colors(names) -> dict[str, str]:
    return {name: color(name) for name in names}


def human_seconds(value: float) -> str:
    """A duration as people read it: 850 µs, 12.3 ms, 4.27 s, 7.5 min, 2.1 h."""
    if value < 1e-3:
        return f"{value * 1e6:.3g} µs"
    if value < 1.0:
        return f"{value * 1e3:.3g} ms"
    if value < 120.0:
        return f"{value:.3g} s"
    if value < 7200.0:
        return f"{value / 60:.3g} min"
    return f"{value / 3600:.3g} h"


def human_bytes(value: float | None) -> str:
    """``1.3 MiB``, ``2.10 GiB``: memory as people read it."""
    if value is None or pd.isna(value):
        return ""
    value = float(value)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def shape_order(table: pd.DataFrame) -> list[str]:
    """Shapes ordered by m·n, then d_out: the category axis of the shape charts."""
    ordered = table.drop_duplicates("shape").sort_values(["numel", "d_out"])
    return list(ordered["shape"])


def with_views(traces: dict[str, list[go.Scatter | go.Bar]], layout: dict, label: str) -> go.Figure:
    """All traces in one figure; a dropdown shows one view's traces at a time (the first
    view opens)."""
    fig = go.Figure()
    views = list(traces)
    spans = []
    for view in views:
        start = len(fig.data)
        for t in traces[view]:
            t.visible = view == views[0]
            fig.add_trace(t)
        spans.append((start, len(fig.data)))
    if len(views) > 1:
        buttons = []
        for view, (a, b) in zip(views, spans):
            mask = [a <= i < b for i in range(len(fig.data))]
            buttons.append({"label": view, "method": "update", "args": [{"visible": mask}]})
        fig.update_layout(updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right", "y": 1.15, "yanchor": "top",
                                        "showactive": True}],
                          annotations=[{"text": label, "x": 0.62, "xref": "paper", "y": 1.13, "yref": "paper",
                                        "showarrow": False, "xanchor": "right"}])
    fig.update_layout(template="plotly_white", margin={"t": 80, "r": 20, "b": 50, "l": 70}, height=460,
                      legend={"groupclick": "togglegroup"}, **layout)
    return fig


def _hover(metric: str, unit: str) -> str:
    return ("<b>%{customdata[0]}</b><br>shape %{customdata[1]} (%{customdata[2]})<br>"
            f"{metric}: %{{y:.6g}} {unit}<br>%{{customdata[3]}}<extra></extra>")


def _key(items: list, entries: list[tuple[str, dict]]) -> None:
    """Grey legend entries that explain the marks (no data)."""
    for label, style in entries:
        items.append(go.Scatter(x=[None], y=[None], name=label, legendgroup="key", legendgrouptitle_text="key",
                                showlegend=True, hoverinfo="skip", **style))


def _shape_axis(table: pd.DataFrame) -> dict:
    return {"type": "category", "categoryorder": "array", "categoryarray": shape_order(table),
            "title": "layer shape d_out x d_in (ordered by m·n)"}


def init_time(table: pd.DataFrame, laws: pd.DataFrame) -> go.Figure:
    """Init time per layer shape, log y, per initializer: filled = measured, hollow =
    predicted by the cost law (skipped over the limit), cross = failed (timeout, crash,
    out of memory) at its predicted time; dotted lines are the fitted laws."""
    traces: dict[str, list] = {}
    for view, group in table.groupby("view", sort=True):
        items = []
        for name, g in group.groupby("initializer"):
            g = g.sort_values(["numel", "d_out"])
            drawn = g[g["time_s"].notna()]
            note = np.where(drawn["failed"], drawn["status"] + ": " + drawn["reason"].fillna("").str.slice(0, 120)
                            + " (time predicted by cost law)",
                            np.where(drawn["extrapolated"], "predicted by cost law (" + drawn["status"] + "): "
                                     + drawn["reason"].fillna("").str.slice(0, 80),
                                     "measured, median of " + drawn["values_s"].map(
                                         lambda v: str(len(v)) if isinstance(v, list) else "?") + " values"))
            custom = np.stack([drawn["initializer"], drawn["shape"], drawn["role"].fillna(""), note], axis=-1)
            symbols = np.where(drawn["failed"], "x", np.where(drawn["extrapolated"], "circle-open", "circle"))
            items.append(go.Scatter(
                x=drawn["shape"], y=drawn["time_s"], name=name, legendgroup=name, mode="lines+markers",
                line={"color": color(name)}, customdata=custom, hovertemplate=_hover("time", "s"),
                marker={"symbol": symbols, "size": np.where(drawn["failed"], 12, 9)},
            ))
            law = laws[(laws["initializer"] == name) & (laws["view"] == view)] if not laws.empty else laws
            if not law.empty and len(g) > 1:
                law = law.iloc[0]
                items.append(go.Scatter(x=g["shape"], y=g["fit_s"], mode="lines", legendgroup=name, showlegend=False,
                                        line={"color": color(name), "dash": "dot", "width": 1},
                                        hovertemplate=f"{name} fit: t ∝ ({law['variable']})^{law['exponent']:.2f}<extra></extra>"))
        _key(items, [("measured", {"mode": "markers", "marker": {"symbol": "circle", "color": KEY}}),
                     ("predicted (skipped)", {"mode": "markers", "marker": {"symbol": "circle-open", "color": KEY}}),
                     ("failed, time predicted", {"mode": "markers", "marker": {"symbol": "x", "color": KEY, "size": 11}}),
                     ("fitted cost law", {"mode": "lines", "line": {"color": KEY, "dash": "dot"}})])
        traces[view] = items
    return with_views(traces, {"title": "Init time per layer shape", "xaxis": _shape_axis(table),
                               "yaxis": {"type": "log", "title": "seconds (median; first call apart)"}}, "view")


def speedup(table: pd.DataFrame, reference_label: str) -> go.Figure:
    """Speedup bars per shape; hatched bars involve a predicted time (either side)."""
    traces: dict[str, list] = {}
    for view, group in table.groupby("view", sort=True):
        items = []
        for name, g in group.groupby("initializer"):
            g = g.sort_values(["numel", "d_out"])
            predicted = (g["extrapolated"] | g["ref_extrapolated"]).to_numpy()
            note = np.where(g["ref_extrapolated"] & g["extrapolated"], "both times predicted by cost laws",
                            np.where(g["ref_extrapolated"], f"{reference_label}'s time predicted by its cost law",
                                     np.where(g["extrapolated"], "this time predicted by its cost law", "both measured")))
            custom = np.stack([g["initializer"], g["shape"], g["role"].fillna(""), note], axis=-1)
            items.append(go.Bar(x=g["shape"], y=g["speedup"], name=name, legendgroup=name,
                                marker={"color": color(name), "pattern": {"shape": np.where(predicted, "/", "")}},
                                customdata=custom, hovertemplate=_hover(f"speedup over {reference_label}", "x")))
        _key(items, [("hatched: involves a predicted time", {"mode": "markers", "marker": {"symbol": "square-open",
                                                                                            "color": KEY}})])
        traces[view] = items
    return with_views(traces, {"title": f"Speedup over {reference_label} (its time / time of the initializer)",
                               "barmode": "group", "yaxis": {"type": "log", "title": f"x faster than {reference_label}"},
                               "xaxis": _shape_axis(table)}, "view")


def memory(table: pd.DataFrame) -> go.Figure:
    """Peak CPU extra RSS and, where CUDA rows exist, peak GPU allocated / reserved."""
    ok = table[table["status"] == "ok"]
    metrics = [("peak_cpu_extra_bytes", "CPU peak RSS above entry", "solid")]
    if "peak_gpu_allocated_bytes" in ok and ok["peak_gpu_allocated_bytes"].fillna(0).gt(0).any():
        metrics += [("peak_gpu_allocated_bytes", "GPU peak allocated", "dash"), ("peak_gpu_reserved_bytes", "GPU peak reserved", "dot")]
    traces: dict[str, list] = {}
    for view, group in ok.groupby("view", sort=True):
        items = []
        for name, g in group.groupby("initializer"):
            g = g.sort_values(["numel", "d_out"])
            for column, label, dash in metrics:
                custom = np.stack([g["initializer"], g["shape"], g["role"].fillna(""),
                                   [f"{label}: {human_bytes(v)}; the weight itself {human_bytes(w)}"
                                    for v, w in zip(g[column].fillna(0), g["weight_bytes"])]], axis=-1)
                floor = 4096 / BYTES_MIB  # one page: a log axis cannot show 0
                items.append(go.Scatter(x=g["shape"], y=(g[column] / BYTES_MIB).clip(lower=floor), name=f"{name}",
                                        legendgroup=name, showlegend=column == "peak_cpu_extra_bytes", mode="lines+markers",
                                        line={"color": color(name), "dash": dash}, customdata=custom,
                                        hovertemplate=_hover(label, "MiB")))
        traces[view] = items
    title = "Peak memory of the init call beyond the weight (solid: CPU RSS" + (", dashed/dotted: GPU allocated/reserved)" if len(metrics) > 1 else "; no CUDA rows in these results)") + "<br><sub>values below one 4 KiB page are drawn at 4 KiB</sub>"
    return with_views(traces, {"title": title, "xaxis": _shape_axis(ok if not ok.empty else table),
                               "yaxis": {"type": "log", "title": "MiB (1024 MiB = 1 GiB)"}}, "view")


def totals(frame: pd.DataFrame) -> go.Figure:
    """Whole-model totals per preset; the dropdown opens on the preset with the most
    measured time. Bars of totals that are mostly predicted are hatched."""
    traces: dict[str, list] = {}
    order = frame.groupby(["preset", "view"], sort=False)["extrapolated_share"].mean().sort_values(kind="stable")
    for preset, view in order.index:
        g = frame[(frame["preset"] == preset) & (frame["view"] == view)].sort_values("total_s")
        notes = [f"{s:.0%} of it predicted by cost laws" + (f", including {n} failed cell(s)" if n else "")
                 for s, n in zip(g["extrapolated_share"], g["failed_cells"])]
        custom = np.stack([g["initializer"], [preset] * len(g), g["layers"].astype(str), notes], axis=-1)
        traces[f"{preset} · {view}"] = [go.Bar(
            x=g["initializer"], y=g["total_s"], customdata=custom,
            marker={"color": [color(n) for n in g["initializer"]],
                    "pattern": {"shape": ["/" if s > 0.5 else "" for s in g["extrapolated_share"]]}},
            hovertemplate="<b>%{customdata[0]}</b> on %{customdata[1]} (%{customdata[2]} layers)<br>total %{y:.4g} s<br>%{customdata[3]}<extra></extra>",
            showlegend=False)]
    return with_views(traces, {"title": "Whole-model init time (Σ per-shape time x count)<br><sub>hatched: more than half "
                                        "of the total predicted by cost laws</sub>",
                               "yaxis": {"type": "log", "title": "seconds"}}, "preset · view")


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _lr_label(lr: float) -> str:
    from bench.core.paired import lr_text

    return f"lr {lr_text(lr)}"


def loss_bands(loss: pd.DataFrame, metric: str, title: str, ytitle: str, trainable: dict[str, int] | None = None) -> go.Figure:
    """Per initializer, the mean over seeds of ``metric`` against step with its 95 % Student-t
    band (none with one seed); a dropdown picks the learning rate. The legend says how many
    parameters each trains."""
    from bench.core.intervals import Interval

    trainable = trainable or {}
    traces: dict[str, list] = {}
    for lr, by_lr in loss.groupby("lr", sort=True, dropna=False):
        items = []
        for name, g in by_lr.groupby("initializer"):
            g = g.dropna(subset=[metric])
            stats = [(step, Interval.of(v[metric].to_numpy())) for step, v in g.groupby("step", sort=True)]
            if not stats:
                continue
            steps = [s for s, _ in stats]
            mean = [iv.mean for _, iv in stats]
            seeds = max(iv.n for _, iv in stats)
            label = f"{name} ({trainable[name] / 1e6:.3g} M trainable)" if trainable.get(name) else name
            if seeds > 1:
                low, high = [iv.low for _, iv in stats], [iv.high for _, iv in stats]
                items.append(go.Scatter(x=steps + steps[::-1], y=high + low[::-1], fill="toself", line={"width": 0, "color": color(name)},
                                        fillcolor=_rgba(color(name), 0.18), hoverinfo="skip", showlegend=False,
                                        legendgroup=name, name=f"{label} 95 % CI"))
            items.append(go.Scatter(x=steps, y=mean, name=label, legendgroup=name, line={"color": color(name)},
                                    mode="lines+markers" if metric == "eval_loss" else "lines",
                                    hovertemplate=f"<b>{label}</b><br>step %{{x}}<br>mean {ytitle} over {seeds} "
                                                  f"seed{'s' if seeds != 1 else ''}: %{{y:.5g}}<extra></extra>"))
        traces[_lr_label(lr)] = items
    sub = "mean over seeds, band: 95 % CI of the mean" if loss["seed"].nunique() > 1 else "one seed: no band"
    return with_views(traces, {"title": f"{title}<br><sub>{sub}</sub>", "xaxis": {"title": "step"},
                               "yaxis": {"title": ytitle}}, "learning rate")


def best_lr(table: pd.DataFrame) -> go.Figure:
    """Final eval loss (mean over seeds, 95 % CI bars) against the learning rate, one line per
    initializer; each one's best lr is the large marker."""
    fig = go.Figure()
    for name, g in table.sort_values("lr").groupby("initializer"):
        err_hi = (g["final_eval_ci_high"] - g["final_eval_mean"]).fillna(0)
        err_lo = (g["final_eval_mean"] - g["final_eval_ci_low"]).fillna(0)
        fig.add_trace(go.Scatter(
            x=g["lr"], y=g["final_eval_mean"], name=name, mode="lines+markers", line={"color": color(name)},
            marker={"size": [14 if b else 7 for b in g["is_best_lr"]], "symbol": ["star" if b else "circle" for b in g["is_best_lr"]]},
            error_y={"type": "data", "symmetric": False, "array": err_hi, "arrayminus": err_lo, "thickness": 1},
            customdata=np.stack([g["seeds"], g["diverged"]], axis=-1),
            hovertemplate=f"<b>{name}</b><br>lr %{{x:.1e}}<br>final eval loss %{{y:.4f}}<br>%{{customdata[0]}} seeds, "
                          "%{customdata[1]} diverged<extra></extra>"))
    fig.update_layout(template="plotly_white", height=420, margin={"t": 60, "r": 20, "b": 50, "l": 70},
                      title="Final eval loss against the learning rate<br><sub>mean over seeds with 95 % CI; "
                            "star: each initializer's best lr</sub>",
                      xaxis={"type": "log", "title": "learning rate"}, yaxis_title="final eval loss")
    return fig


def magnitude_scatter(summary: pd.DataFrame, relation: pd.DataFrame) -> go.Figure:
    """Every run: final update magnitude Σ‖ΔW‖_F against final eval loss (the LoRAM paper's
    thesis that magnitude drives convergence), colour: initializer, symbol: learning rate."""
    symbols = ["circle", "square", "diamond", "triangle-up", "x", "cross"]
    lrs = sorted(summary["lr"].unique())
    ok = summary.dropna(subset=["final_update_norm", "final_eval_loss"])
    fig = go.Figure()
    for (name, lr), g in ok.groupby(["initializer", "lr"]):
        fig.add_trace(go.Scatter(
            x=g["final_update_norm"], y=g["final_eval_loss"], mode="markers", name=f"{name} {_lr_label(lr)}",
            legendgroup=name, marker={"color": color(name), "symbol": symbols[lrs.index(lr) % len(symbols)], "size": 9},
            customdata=g["seed"], hovertemplate=f"<b>{name}</b> {_lr_label(lr)} seed %{{customdata}}<br>"
                                                "Σ‖ΔW‖_F %{x:.4g}<br>final eval loss %{y:.4f}<extra></extra>"))
    overall = relation[relation["lr"] == "all"] if not relation.empty else relation
    sub = ""
    if not overall.empty and pd.notna(overall["spearman_rho"].iloc[0]):
        sub = (f"Spearman ρ = {overall['spearman_rho'].iloc[0]:+.2f} over {int(overall['runs'].iloc[0])} runs "
               f"(p = {overall['p_value'].iloc[0]:.2g}); within each lr and initializer in the table below; a "
               "correlation, not a test (the layer task's magnitude arms are the test)")
    fig.update_layout(template="plotly_white", height=460, margin={"t": 70, "r": 20, "b": 50, "l": 70},
                      title=f"Update magnitude against eval loss, every run<br><sub>{sub}</sub>",
                      xaxis={"type": "log", "title": "final Σ‖W_eff(T) − W_eff(0)‖_F"}, yaxis_title="final eval loss")
    return fig


def history_trend(history: pd.DataFrame) -> go.Figure:
    """Median init time per run (x: run order) for each initializer; dropdown: shape.

    ``change`` rows (``loram-bench continuous``: a change the gate confirmed) are drawn on
    the point of the run that confirmed them: a red triangle up for a slowdown or memory
    growth, a green triangle down for a speedup, with the ratio and its interval on hover.
    """
    kind = history["kind"] if "kind" in history else pd.Series("history", index=history.index)
    changes, history = history[kind.eq("change")], history[~kind.eq("change")]
    traces: dict[str, list] = {}
    runs = {rid: i for i, rid in enumerate(dict.fromkeys(history["run_id"]))}
    points = history.assign(order=history["run_id"].map(runs))
    for shape, g in points.groupby("shape", sort=False):
        items = []
        for name, h in g.groupby("initializer"):
            h = h.sort_values("order")
            custom = np.stack([h["initializer"], h["shape"], h["git_commit"].str[:10], h["machine"]], axis=-1)
            items.append(go.Scatter(x=h["order"], y=h["median_s"], name=name, mode="lines+markers", line={"color": color(name)},
                                    customdata=custom, hovertemplate="<b>%{customdata[0]}</b> %{customdata[1]}<br>commit %{customdata[2]}<br>%{customdata[3]}<br>median %{y:.5g} s<extra></extra>"))
        marks = _change_marks(changes[changes["shape"] == shape] if not changes.empty else changes, g)
        traces[shape] = items + marks
    return with_views(traces, {"title": "History: median init time per run (triangles: changes the gate confirmed)",
                               "xaxis": {"title": "run (oldest first)"}, "yaxis": {"type": "log", "title": "seconds"}},
                      "shape")


def _change_marks(changes: pd.DataFrame, points: pd.DataFrame) -> list[go.Scatter]:
    """Markers for confirmed changes, placed on the history point of the same run and cell."""
    if changes.empty:
        return []
    own = changes.drop(columns=[c for c in ("order", "median_s") if c in changes])  # one frame: these are NaN here
    placed = own.merge(points[["run_id", "task_key", "order", "median_s"]], on=["run_id", "task_key"], how="inner")
    out = []
    for worse, symbol, colour, label in ((True, "triangle-up", "#c0392b", "confirmed slower / more memory"),
                                         (False, "triangle-down", "#1e8449", "confirmed faster / less memory")):
        bad = placed["verdict"].str.contains("slower|more memory")
        part = placed[bad if worse else ~bad]
        if part.empty:
            continue
        text = [f"<b>{r.initializer}</b> {r.shape}: {r.verdict}<br>time x{r.time_ratio:.3f} "
                f"[{r.confirm_low:.3f}, {r.confirm_high:.3f}]<br>{str(r.base_commit)[:10]} -> {str(r.git_commit)[:10]}"
                for r in part.itertuples()]
        out.append(go.Scatter(x=part["order"], y=part["median_s"], mode="markers", name=label, text=text,
                              marker={"symbol": symbol, "size": 15, "color": colour, "line": {"width": 1, "color": "black"}},
                              hovertemplate="%{text}<extra></extra>"))
    return out


def fidelity_by_niter(table: pd.DataFrame) -> go.Figure:
    """Largest principal angle to the exact subspace against the number of subspace
    iterations (columns ``fidelity_angle_deg_niter<k>``), one line per initializer and shape."""
    columns = sorted((c for c in table.columns if c.startswith("fidelity_angle_deg_niter")),
                     key=lambda c: int(c.rsplit("niter", 1)[1]))
    niters = [int(c.rsplit("niter", 1)[1]) for c in columns]
    fig = go.Figure()
    for _, row in table.dropna(subset=columns).sort_values(["numel", "d_out"]).iterrows():
        fig.add_trace(go.Scatter(x=niters, y=[row[c] for c in columns], mode="lines+markers",
                                 name=f"{row['initializer']} {row['shape']}", line={"color": color(row["initializer"])},
                                 hovertemplate="niter %{x}: %{y:.3g}°<extra>%{fullData.name}</extra>"))
    fig.update_layout(template="plotly_white", height=420, margin={"t": 60, "r": 20, "b": 50, "l": 70},
                      title="Randomized SVD against the exact SVD: largest principal angle of the top-r subspace",
                      xaxis_title="subspace iterations (niter)", yaxis_title="degrees (0 = exact subspace)")
    return fig


def roofline(table: pd.DataFrame) -> go.Figure:
    """Each measured cell's median time as a multiple of its own hardware floor (1 = at
    the floor: as fast as its declared bytes and flops allow on this machine)."""
    ok = table[table["status"].eq("ok") & table["floor_ratio"].notna()]
    traces: dict[str, list] = {}
    for view, group in ok.groupby("view", sort=True):
        items = []
        for name, g in group.groupby("initializer"):
            g = g.sort_values(["numel", "d_out"])
            custom = np.stack([g["initializer"], g["shape"], g["role"].fillna(""),
                               [f"median {t:.4g} s, floor {f:.4g} s" for t, f in zip(g["median_s"], g["floor_s"])]], axis=-1)
            items.append(go.Scatter(x=g["shape"], y=g["floor_ratio"], name=name, legendgroup=name, mode="lines+markers",
                                    line={"color": color(name)}, customdata=custom,
                                    hovertemplate=_hover("multiple of the floor", "x")))
        traces[view] = items
    fig = with_views(traces, {"title": "Distance from the hardware: time / floor (floor = read bytes / read bandwidth + "
                                       "max(read-write bytes / bandwidth, flops / GEMM rate))",
                              "xaxis": _shape_axis(ok if not ok.empty else table),
                              "yaxis": {"type": "log", "title": "x the floor (1 = at the floor)"}}, "view")
    fig.add_hline(y=1.0, line={"color": KEY, "dash": "dash"})
    return fig


def layer_curves(frame: pd.DataFrame) -> go.Figure:
    """Normalized error against step per initializer, mean over seeds with its 95 % band; a
    dropdown picks the (shape, alignment, lr)."""
    from bench.core.intervals import Interval
    from bench.core.paired import lr_text

    traces: dict[str, list] = {}
    frame = frame.sort_values(["numel", "shape", "alignment", "lr"])
    for (shape, alignment, lr), g in frame.groupby(["shape", "alignment", "lr"], sort=False):
        items = []
        for name, runs in g.groupby("initializer"):
            curves = [c for c in runs["loss"] if isinstance(c, list) and c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            values = np.array([c[:length] for c in curves], dtype=float)
            stats = [Interval.of(values[:, t]) for t in range(length)]
            steps = list(range(length))
            mean = [iv.mean for iv in stats]
            if len(curves) > 1:
                low, high = [iv.low for iv in stats], [iv.high for iv in stats]
                items.append(go.Scatter(x=steps + steps[::-1], y=high + low[::-1], fill="toself",
                                        line={"width": 0, "color": color(name)}, fillcolor=_rgba(color(name), 0.18),
                                        hoverinfo="skip", showlegend=False, legendgroup=name))
            items.append(go.Scatter(x=steps, y=mean, name=name, legendgroup=name, line={"color": color(name)},
                                    hovertemplate=f"<b>{name}</b><br>step %{{x}}<br>mean error over {len(curves)} "
                                                  f"seeds: %{{y:.4f}}<extra></extra>"))
        traces[f"{shape} · {alignment} · lr {lr_text(lr)}"] = items
    return with_views(traces, {"title": "Normalized error ‖(W_eff − W − ΔW*)Σ^½‖² / ‖ΔW*Σ^½‖² per step<br>"
                                        "<sub>mean over seeds, band: 95 % CI of the mean; 1 = no progress</sub>",
                               "xaxis": {"title": "step"}, "yaxis": {"title": "normalized error"}},
                      "shape · alignment · lr")


def _by_alignment(table: pd.DataFrame, y: str, low: str, high: str, title: str, ytitle: str,
                  zero_line: bool = False) -> go.Figure:
    from plotly.subplots import make_subplots

    alignments = [a for a in ("aligned", "random", "bottom") if a in set(table["alignment"])]
    if not alignments:
        return go.Figure(layout={"title": f"{title}: no runs to draw", "template": "plotly_white", "height": 200})
    fig = make_subplots(rows=1, cols=len(alignments), shared_yaxes=True,
                        subplot_titles=[f"{a} target" for a in alignments], horizontal_spacing=0.04)
    for col, alignment in enumerate(alignments, start=1):
        part = table[(table["alignment"] == alignment) & table[y].notna()].sort_values("numel")
        for name, g in part.groupby("initializer"):
            fig.add_trace(go.Scatter(
                x=g["numel"], y=g[y], name=name, legendgroup=name, showlegend=col == 1, mode="lines+markers",
                line={"color": color(name)},
                error_y={"type": "data", "symmetric": False, "array": (g[high] - g[y]).fillna(0),
                         "arrayminus": (g[y] - g[low]).fillna(0), "thickness": 1},
                customdata=np.stack([g["shape"], g["lr"]], axis=-1),
                hovertemplate=f"<b>{name}</b><br>%{{customdata[0]}} at its best lr %{{customdata[1]:.1e}}<br>"
                              f"{ytitle} %{{y:.4f}}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(type="log", title_text="layer size m·n", row=1, col=col)
        if zero_line:
            fig.add_hline(y=0, line={"color": "#888", "dash": "dot"}, row=1, col=col)
    fig.update_yaxes(title_text=ytitle, row=1, col=1)
    fig.update_layout(template="plotly_white", height=440, margin={"t": 90, "r": 20, "b": 50, "l": 70}, title=title,
                      legend={"groupclick": "togglegroup"})
    return fig


def layer_error_by_size(table: pd.DataFrame) -> go.Figure:
    """Final normalized error at each initializer's best lr against the layer size, per alignment."""
    best = table[table["is_best_lr"]]
    return _by_alignment(best, "final_eval_mean", "final_eval_ci_low", "final_eval_ci_high",
                         "Final error against layer size<br><sub>each initializer at its best lr per shape; "
                         "mean over seeds with 95 % CI</sub>", "final normalized error")


def layer_diff_by_size(table: pd.DataFrame, reference: str) -> go.Figure:
    """The paired difference to the reference (both at their best lrs) against the layer size:
    below 0, better than the reference; a slope says whether that changes with the layer."""
    best = table[table["is_best_lr"] & (table["initializer"] != reference)]
    return _by_alignment(best, "best_diff_mean", "best_diff_ci_low", "best_diff_ci_high",
                         f"Difference to {reference} against layer size<br><sub>paired over seeds, 95 % CI; "
                         "below 0: better; each at its best lr</sub>", f"error − {reference}'s", zero_line=True)


#: Line dash per sharding placement in the sharded charts.
PLACEMENT_DASH = {"row": "solid", "col": "dash"}


def _sharded_hover(metric: str) -> str:
    return ("<b>%{customdata[0]}</b> (%{customdata[1]} placement)<br>%{customdata[2]} ranks, shape %{customdata[3]}<br>"
            f"{metric}: %{{customdata[4]}}<br>%{{customdata[5]}}<extra></extra>")


def _per_rank(values, fmt) -> str:
    if not isinstance(values, list) or not values:
        return ""
    return "per rank: " + ", ".join("?" if v is None else fmt(v) for v in values)


def sharded_scaling(table: pd.DataFrame, metric: str) -> go.Figure:
    """One sharded metric against the world size, a line per (initializer, placement),
    a dropdown view per shape · device · dtype.

    ``metric``: ``time`` (the slowest rank's median over the timed calls, bars from the
    fastest to the slowest call), ``memory`` (the largest per-rank peak RSS above entry,
    every rank on hover) or ``bytes`` (bytes sent per rank). A row that timed out is a
    cross at its limit (time), or an open triangle at the peak its ranks had reached when
    they were killed (memory: a lower bound).
    """
    spec = {
        "time": ("time_s", "s", "seconds (slowest rank; bars: fastest to slowest call)"),
        "memory": ("max_peak_cpu_extra_bytes", "MiB", "MiB per rank (the largest rank; 1024 MiB = 1 GiB)"),
        "bytes": ("max_bytes_sent", "B", "bytes sent per rank (ring schedule; 0 drawn at 1 B)"),
    }[metric]
    column, _, ytitle = spec
    traces: dict[str, list] = {}
    frame = table.copy()
    frame["view_label"] = frame["shape"] + " · " + frame["device"] + " · " + frame["dtype"]
    for view, group in frame.groupby("view_label", sort=False):
        items = []
        for (name, placement), g in group.groupby(["initializer", "placement"], sort=True):
            g = g.sort_values("world_size")
            ok = g[g["status"] == "ok"]
            # a log axis cannot show 0: memory below one 4 KiB page is drawn at 4 KiB, 0 bytes sent at 1 B
            if metric == "time":
                y = ok[column]
            elif metric == "memory":
                y = (ok[column] / BYTES_MIB).clip(lower=4096 / BYTES_MIB)
            else:
                y = ok[column].clip(lower=1)
            if metric == "time":
                detail = [_per_rank([min(t) if t else None for t in v], lambda s: f"{s:.3g} s") for v in ok["rank_values_s"]]
                shown = [f"{v:.4g} s" for v in ok[column]]
                lows = [v - min(vs) if vs else 0 for v, vs in zip(ok[column], ok["values_s"])]
                highs = [max(vs) - v if vs else 0 for v, vs in zip(ok[column], ok["values_s"])]
                error = {"type": "data", "symmetric": False, "array": highs, "arrayminus": lows, "thickness": 1}
            else:
                source = "peak_cpu_extra_bytes" if metric == "memory" else "bytes_sent"
                detail = [_per_rank(v, human_bytes) + f"; shard {human_bytes(max(w) if isinstance(w, list) and w else None)}"
                          for v, w in zip(ok[source], ok["local_weight_bytes"])]
                shown = [human_bytes(v) for v in ok[column]]
                error = None
            custom = np.stack([ok["initializer"], ok["placement"], ok["world_size"], ok["shape"], shown, detail], axis=-1) \
                if len(ok) else None
            items.append(go.Scatter(
                x=ok["world_size"], y=y, name=f"{name} ({placement})", legendgroup=name, mode="lines+markers",
                line={"color": color(name), "dash": PLACEMENT_DASH.get(placement, "dot")}, customdata=custom,
                hovertemplate=_sharded_hover(metric), error_y=error))
            failed = g[g["status"] != "ok"]
            if metric in ("time", "memory") and len(failed):
                if metric == "time":
                    fy = failed["limit_s"]
                    symbol, what = "x", "≥ the limit"
                else:
                    fy = failed["max_peak_cpu_extra_bytes"] / BYTES_MIB
                    symbol, what = "triangle-up-open", "≥ this when killed"
                keep = fy.notna()
                if keep.any():
                    f = failed[keep]
                    custom = np.stack([f["initializer"], f["placement"], f["world_size"], f["shape"],
                                       [f"{s}: {what}" for s in f["status"]], f["reason"].fillna("").str.slice(0, 160)],
                                      axis=-1)
                    items.append(go.Scatter(x=f["world_size"], y=fy[keep], mode="markers", legendgroup=name,
                                            showlegend=False, marker={"symbol": symbol, "size": 12, "color": color(name)},
                                            customdata=custom, hovertemplate=_sharded_hover(metric)))
        if metric != "bytes":
            _key(items, [("row placement (Shard(0))", {"mode": "lines", "line": {"color": KEY}}),
                         ("column placement (Shard(1))", {"mode": "lines", "line": {"color": KEY, "dash": "dash"}}),
                         ("timed out: ≥ the limit" if metric == "time" else "killed at the limit: peak so far",
                          {"mode": "markers", "marker": {"symbol": "x" if metric == "time" else "triangle-up-open",
                                                         "color": KEY, "size": 11}})])
        traces[view] = items
    titles = {"time": "Sharded init time against world size",
              "memory": "Per-rank peak memory of the sharded init call beyond the shard",
              "bytes": "Bytes each rank sends, counted at the collectives"}
    worlds = sorted(frame["world_size"].unique())
    return with_views(traces, {"title": titles[metric],
                               "xaxis": {"title": "world size (ranks)", "tickvals": worlds, "type": "log"},
                               "yaxis": {"type": "log", "title": ytitle}}, "shape · device · dtype")


#: The plane's outcome colours: wins, loses, and the two kinds of no verdict.
OUTCOME_TEXT = {"wins": "wins", "loses": "loses", "equivalent": "as good as", "tie": "not told apart"}


def layer_plane(plane: pd.DataFrame, reference: str) -> go.Figure:
    """Where each initializer wins and loses over the (target rank, target scale) plane: the
    paired difference to the reference at the chosen lrs (colour; below 0 is better), each
    cell's outcome, 95 % CI, MDE and capacity floor on hover; a dropdown picks the
    initializer (and the plane's shape and alignment)."""
    from bench.core.paired import lr_text

    traces: dict[str, list] = {}
    challengers = plane[plane["outcome"] != "reference"]
    span = float(np.nanmax(np.abs(challengers["best_diff_mean"]))) if not challengers.empty else 1.0
    span = span if np.isfinite(span) and span > 0 else 1.0
    for (shape, alignment, name), g in challengers.groupby(["shape", "alignment", "initializer"], sort=True):
        ranks = sorted(g["target_rank"].unique())
        scales = sorted(g["target_scale"].unique())
        z = np.full((len(ranks), len(scales)), np.nan)
        text = np.full((len(ranks), len(scales)), "", dtype=object)
        hover = np.full((len(ranks), len(scales)), "", dtype=object)
        for r in g.itertuples():
            i, j = ranks.index(r.target_rank), scales.index(r.target_scale)
            z[i, j] = r.best_diff_mean
            mark = "" if r.lr_status == "bracketed" else " (edge)"
            text[i, j] = f"{OUTCOME_TEXT.get(r.outcome, r.outcome)}{mark}<br>{r.best_diff_mean:+.3f}"
            hover[i, j] = (f"{r.initializer} − {reference}: {r.best_diff_mean:+.4f} [{r.best_diff_ci_low:+.4f}, "
                           f"{r.best_diff_ci_high:+.4f}], Holm p {r.best_p_holm:.2g}, MDE ±{r.best_mde:.4f}<br>"
                           f"final {r.final_eval_mean:.4f} at lr {lr_text(r.lr)} ({r.lr_status}); capacity floor "
                           f"{r.capacity_floor_mean:.4f} {('— ' + r.reach) if r.reach else ''}")
        traces[f"{name} · {shape} · {alignment}"] = [go.Heatmap(
            x=[f"{s:g}" for s in scales], y=[f"k = {k}" for k in ranks], z=z, text=text, texttemplate="%{text}",
            customdata=hover, hovertemplate="%{customdata}<extra></extra>", zmid=0.0, zmin=-span, zmax=span,
            colorscale="RdBu_r", colorbar={"title": f"− {reference}"})]
    if not traces:
        return go.Figure(layout={"title": "The (target rank, scale) plane: no cells to draw", "height": 200,
                                 "template": "plotly_white"})
    return with_views(traces, {"title": f"Where each initializer wins and loses against {reference}<br><sub>paired "
                                        "difference in final normalized error at the chosen lrs (blue: better); "
                                        "target rank k against ‖ΔW*‖/‖W‖; r = 8</sub>",
                               "xaxis": {"title": "target scale ‖ΔW*‖_F / ‖W‖_F", "type": "category"},
                               "yaxis": {"title": "target rank", "type": "category"}}, "initializer · shape · alignment")


def layer_floors(frame: pd.DataFrame) -> go.Figure:
    """Every scored run: its capacity floor (computed before training) against its final
    error. On the diagonal a run ended at its floor: no lr or step count would do better."""
    scored = frame[frame["stage"].isin(("evaluation", "selection+evaluation")) & (frame["arm"] == "")
                   & frame["capacity_floor"].notna() & frame["final_loss"].notna()]
    fig = go.Figure()
    for name, g in scored.groupby("initializer"):
        custom = np.stack([g["shape"], g["alignment"], g["lr"], g["spec_target_rank"], g["spec_target_scale"]], axis=-1)
        fig.add_trace(go.Scattergl(
            x=g["capacity_floor"], y=g["final_loss"], mode="markers", name=name, marker={"color": color(name), "size": 5},
            customdata=custom, hovertemplate=f"<b>{name}</b><br>%{{customdata[0]}} %{{customdata[1]}}, k = "
                                              "%{customdata[3]}, scale %{customdata[4]}<br>lr %{customdata[2]:.3g}<br>"
                                              "floor %{x:.4f}, final %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"color": KEY, "dash": "dash"}, name="final = floor",
                             hoverinfo="skip"))
    fig.update_layout(template="plotly_white", height=460, margin={"t": 80, "r": 20, "b": 50, "l": 70},
                      title="Capacity floor against final error, every scored run<br><sub>the floor is computed from "
                            "the step-0 factors, the target and Σ before training; on the dashed line a run is at "
                            "its floor (cannot reach lower), above it optimization is what is missing</sub>",
                      xaxis={"title": "capacity floor", "range": [-0.02, 1.05]},
                      yaxis={"title": "final normalized error"})
    return fig


def layer_magnitude(table: pd.DataFrame, reference: str) -> go.Figure:
    """Final error at matched first-step update magnitude: LoRAM at gain c and the reference
    (noise-zeros) at the lr that gives the same first-step ‖ΔW_eff‖, mean over seeds with the
    paired CI."""
    fig = go.Figure()
    keys = ["initializer", "shape", "alignment"] + [c for c in ("target_scale",) if c in table]
    for key, g in table.groupby(keys):
        name, shape = key[0], key[1]
        cell = f"{shape}, scale {key[3]:g}" if len(key) > 3 else shape
        g = g.sort_values("gain")
        fig.add_trace(go.Scatter(x=g["gain"], y=g["loss_mean"], mode="lines+markers", name=f"{name} ({cell})",
                                 line={"color": color(name)},
                                 hovertemplate=f"<b>{name}</b> gain %{{x:g}}<br>final %{{y:.4f}}<extra></extra>"))
        fig.add_trace(go.Scatter(
            x=g["gain"], y=g["matched_loss_mean"], mode="lines+markers", name=f"{reference} matched to {name} ({cell})",
            line={"color": color(reference), "dash": "dash"},
            error_y={"type": "data", "symmetric": False, "array": (g["diff_ci_high"] - g["diff_mean"]).fillna(0),
                     "arrayminus": (g["diff_mean"] - g["diff_ci_low"]).fillna(0), "thickness": 1},
            customdata=np.stack([g["matched_noise_lr"], g["first_step_ratio"]], axis=-1),
            hovertemplate=f"{reference} at lr %{{customdata[0]:.3g}} (first-step norm ratio %{{customdata[1]:.3f}})<br>"
                          "final %{y:.4f}; bar: 95 % CI of the paired difference<extra></extra>"))
    fig.update_layout(template="plotly_white", height=420, margin={"t": 80, "r": 20, "b": 50, "l": 70},
                      title="Magnitude by intervention: final error at matched first-step ‖ΔW_eff‖<br><sub>LoRAM at "
                            "gain c·β (its chosen lr) and noise-zeros at the lr matching each arm's first step</sub>",
                      xaxis={"title": "LoRAM gain multiplier c", "type": "log",
                             "tickvals": sorted(table["gain"].unique()) if not table.empty else None,
                             "ticktext": [f"{g:g}" for g in sorted(table["gain"].unique())] if not table.empty else None},
                      yaxis={"title": "final normalized error"})
    return fig
