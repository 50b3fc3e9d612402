"""Plotly figures of the report. Each takes tidy tables (``reports.tables``) and returns a
``go.Figure``; views that a reader picks (device · dtype, preset) are a dropdown that
toggles trace visibility, so the page needs no server."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from bench import costlaw

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
BYTES_MIB = 1 << 20


def colors(names) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(names))}


def _view(row) -> str:
    return f"{row['device']} · {row['dtype']} · r={row['rank']}"


def with_views(traces: dict[str, list[go.Scatter | go.Bar]], layout: dict, label: str) -> go.Figure:
    """All traces in one figure; a dropdown shows one view's traces at a time."""
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


def init_time(table: pd.DataFrame, laws: pd.DataFrame) -> go.Figure:
    """Init time against layer size m·n, log-log, per initializer; hollow markers are
    cells predicted by the cost law (skipped or failed); dashed lines are the fits."""
    col = colors(table["initializer"].unique())
    traces: dict[str, list] = {}
    for view, group in table.groupby(table.apply(_view, axis=1), sort=True):
        items = []
        for name, g in group.groupby("initializer"):
            g = g.sort_values("numel")
            custom = np.stack([g["initializer"], g["shape"], g["role"].fillna(""),
                               np.where(g["extrapolated"], "predicted by cost law (" + g["status"] + ")",
                                        "measured, median of " + g["values_s"].map(lambda v: str(len(v)) if isinstance(v, list) else "?") + " values")], axis=-1)
            items.append(go.Scatter(
                x=g["numel"], y=g["time_s"], name=name, legendgroup=name, mode="lines+markers",
                line={"color": col[name]}, customdata=custom, hovertemplate=_hover("time", "s"),
                marker={"symbol": np.where(g["extrapolated"], "circle-open", "circle"), "size": 9},
            ))
            law = laws[(laws["initializer"] == name) & (laws.apply(_view, axis=1) == view)] if not laws.empty else laws
            if not law.empty and g["numel"].max() > g["numel"].min():
                law = law.iloc[0]
                xs = np.geomspace(g["numel"].min(), g["numel"].max(), 20)
                # the law is in its own size variable; draw it along the measured shapes' aspect
                fit_y = [law["coefficient"] * costlaw.size_variable(name, *_shape_at(g, x)) ** law["exponent"] for x in xs]
                items.append(go.Scatter(x=xs, y=fit_y, mode="lines", legendgroup=name, showlegend=False,
                                        line={"color": col[name], "dash": "dot", "width": 1},
                                        hovertemplate=f"{name} fit: t ∝ ({law['variable']})^{law['exponent']:.2f}<extra></extra>"))
        traces[view] = items
    return with_views(traces, {"title": "Init time per layer shape (log-log)", "xaxis": {"type": "log", "title": "layer size m·n"},
                               "yaxis": {"type": "log", "title": "seconds (median; first call apart)"}}, "device · dtype")


def _shape_at(group: pd.DataFrame, numel: float) -> tuple[float, float]:
    """A (d_out, d_in) of size ``numel`` with the aspect of the nearest measured shape."""
    nearest = group.iloc[(np.log(group["numel"]) - math.log(numel)).abs().argmin()]
    aspect = nearest["d_out"] / nearest["d_in"]
    d_in = math.sqrt(numel / aspect)
    return aspect * d_in, d_in


def speedup(table: pd.DataFrame) -> go.Figure:
    col = colors(table["initializer"].unique()) if not table.empty else {}
    traces: dict[str, list] = {}
    for view, group in table.groupby(table.apply(_view, axis=1), sort=True):
        items = []
        for name, g in group.groupby("initializer"):
            g = g.sort_values("numel")
            note = np.where(g["extrapolated"] | g["ref_extrapolated"], "involves a cost-law prediction", "both measured")
            custom = np.stack([g["initializer"], g["shape"], g["role"].fillna(""), note], axis=-1)
            items.append(go.Bar(x=g["shape"], y=g["speedup"], name=name, legendgroup=name, marker={"color": col[name]},
                                customdata=custom, hovertemplate=_hover("speedup over full-SVD PiSSA", "x")))
        traces[view] = items
    return with_views(traces, {"title": "Speedup over full-SVD PiSSA (time of pissa / time of initializer)",
                               "barmode": "group", "yaxis": {"type": "log", "title": "x faster than pissa"},
                               "xaxis": {"title": "layer shape d_out x d_in"}}, "device · dtype")


def memory(table: pd.DataFrame) -> go.Figure:
    """Peak CPU extra RSS and, where CUDA rows exist, peak GPU allocated / reserved."""
    ok = table[table["status"] == "ok"]
    col = colors(ok["initializer"].unique())
    metrics = [("peak_cpu_extra_bytes", "CPU peak RSS above entry", "solid")]
    if "peak_gpu_allocated_bytes" in ok and ok["peak_gpu_allocated_bytes"].fillna(0).gt(0).any():
        metrics += [("peak_gpu_allocated_bytes", "GPU peak allocated", "dash"), ("peak_gpu_reserved_bytes", "GPU peak reserved", "dot")]
    traces: dict[str, list] = {}
    for view, group in ok.groupby(ok.apply(_view, axis=1), sort=True):
        items = []
        for name, g in group.groupby("initializer"):
            g = g.sort_values("numel")
            for column, label, dash in metrics:
                custom = np.stack([g["initializer"], g["shape"], g["role"].fillna(""),
                                   [f"{label}: {v / BYTES_MIB:.4g} MiB exactly; weight itself {w / BYTES_MIB:.1f} MiB"
                                    for v, w in zip(g[column].fillna(0), g["weight_bytes"])]], axis=-1)
                floor = 4096 / BYTES_MIB  # one page: a log axis cannot show 0
                items.append(go.Scatter(x=g["numel"], y=(g[column] / BYTES_MIB).clip(lower=floor), name=f"{name}", legendgroup=name,
                                        showlegend=column == "peak_cpu_extra_bytes", mode="lines+markers",
                                        line={"color": col[name], "dash": dash}, customdata=custom,
                                        hovertemplate=_hover(label, "MiB")))
        traces[view] = items
    title = "Peak memory of the init call beyond the weight (solid: CPU RSS" + (", dashed/dotted: GPU allocated/reserved)" if len(metrics) > 1 else "; no CUDA rows in these results)") + "<br><sub>values below one 4 KiB page are drawn at 4 KiB</sub>"
    return with_views(traces, {"title": title, "xaxis": {"type": "log", "title": "layer size m·n"},
                               "yaxis": {"type": "log", "title": "MiB"}}, "device · dtype")


def totals(frame: pd.DataFrame) -> go.Figure:
    col = colors(frame["initializer"].unique())
    traces: dict[str, list] = {}
    for (preset, view), g in frame.groupby([frame["preset"], frame.apply(_view, axis=1)], sort=False):
        g = g.sort_values("total_s")
        custom = np.stack([g["initializer"], [preset] * len(g), g["layers"].astype(str),
                           [f"{s:.0%} of it predicted by cost laws" for s in g["extrapolated_share"]]], axis=-1)
        traces[f"{preset} · {view}"] = [go.Bar(
            x=g["initializer"], y=g["total_s"], marker={"color": [col[n] for n in g["initializer"]]}, customdata=custom,
            hovertemplate="<b>%{customdata[0]}</b> on %{customdata[1]} (%{customdata[2]} layers)<br>total %{y:.4g} s<br>%{customdata[3]}<extra></extra>",
            showlegend=False)]
    return with_views(traces, {"title": "Whole-model init time (Σ per-shape time x count)",
                               "yaxis": {"type": "log", "title": "seconds"}}, "preset · device · dtype")


def loss_curves(loss: pd.DataFrame, metric: str, title: str, ytitle: str) -> go.Figure:
    col = colors(loss["initializer"].unique())
    fig = go.Figure()
    for name, g in loss.groupby("initializer"):
        g = g.sort_values("step").dropna(subset=[metric])
        fig.add_trace(go.Scatter(x=g["step"], y=g[metric], name=name, mode="lines+markers" if metric == "eval_loss" else "lines",
                                 line={"color": col[name]},
                                 hovertemplate=f"<b>{name}</b><br>step %{{x}}<br>{ytitle}: %{{y:.5g}}<extra></extra>"))
    fig.update_layout(template="plotly_white", title=title, xaxis_title="step", yaxis_title=ytitle, height=420,
                      margin={"t": 60, "r": 20, "b": 50, "l": 70})
    return fig


def history_trend(history: pd.DataFrame) -> go.Figure:
    """Median init time per run (x: run order) for each initializer; dropdown: shape."""
    col = colors(history["initializer"].unique())
    traces: dict[str, list] = {}
    runs = {rid: i for i, rid in enumerate(dict.fromkeys(history["run_id"]))}
    for shape, g in history.groupby("shape", sort=False):
        items = []
        for name, h in g.groupby("initializer"):
            h = h.assign(order=h["run_id"].map(runs)).sort_values("order")
            custom = np.stack([h["initializer"], h["shape"], h["git_commit"].str[:10], h["machine"]], axis=-1)
            items.append(go.Scatter(x=h["order"], y=h["median_s"], name=name, mode="lines+markers", line={"color": col[name]},
                                    customdata=custom, hovertemplate="<b>%{customdata[0]}</b> %{customdata[1]}<br>commit %{customdata[2]}<br>%{customdata[3]}<br>median %{y:.5g} s<extra></extra>"))
        traces[shape] = items
    return with_views(traces, {"title": "History: median init time per run", "xaxis": {"title": "run (oldest first)"},
                               "yaxis": {"type": "log", "title": "seconds"}}, "shape")
