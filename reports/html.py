"""Assemble the report: one self-contained HTML page, plotly.js inlined once in <head>,
every figure a div, plus HTML tables (cost laws, comparison, all rows, environment)."""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.offline

from bench.core.defaults import SPEEDUP_REFERENCE
from bench.core.identity import IDENTITY_FIELDS
from bench.initcost.metrics import METRICS
from loram_ref import INITIALIZERS
from reports import figures
from reports.tables import (
    FACT_COLUMNS,
    ResultSet,
    cells,
    cost_laws,
    decision_summary,
    failures,
    load_results,
    model_totals,
    speedups,
    without_totals,
)

_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}}

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1280px;padding:0 24px 48px;color:#222}
h1{margin:24px 0 4px} h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
.note{color:#555;font-size:14px} table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap} th{background:#f4f4f4;cursor:pointer;position:sticky;top:0}
td:first-child,th:first-child{text-align:left} .scroll{max-height:520px;overflow:auto;border:1px solid #eee}
.bad{background:#fde2e1} .good{background:#e3f5e1} .warn{background:#fff4d6} nav a{margin-right:14px}
td.reason{white-space:normal;min-width:320px;max-width:640px;text-align:left}
"""

# Click a header to sort its table (numbers numerically, text otherwise).
_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""

#: The rows table: identity, role, status and reason first, then every metric of the metric table.
ROW_COLUMNS = [*IDENTITY_FIELDS[:-1], "role", "status", "phase", "reason", "processes", *(m.name for m in METRICS), "stdev_s"]
FAILURE_COLUMNS = ["initializer", "shape", "rank", "dtype", "device", "threads", "status", "phase", "reason", "predicted_s",
                   "limit_s", "run_id"]
#: Row classes by status: failures red, skips yellow.
STATUS_CSS = {"timeout": "bad", "crashed": "bad", "failed": "bad", "oom": "bad", "skipped": "warn"}
ENV_COLUMNS = ["git_commit", "git_dirty", "hostname", "platform", "python", "cpu_model", "cpu_count", "memory_bytes",
               "torch_version", "transformers_version", "peft_version", "gpu_name", "cuda_version", "run_id", "timestamp"]


def _fmt(value: Any, column: str = "") -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if column.endswith("_bytes") and isinstance(value, (int, float)):
        return figures.human_bytes(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _e(value: Any, spec: str = "") -> str:
    """A value from a results file as HTML text: formatted (``spec`` for numbers), then
    escaped. Every value that reaches the page from a row goes through here or
    :func:`table_html`: rows are data, never markup."""
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool) and not pd.isna(value):
        return html.escape(format(value, spec))
    return html.escape(_fmt(value))


def table_html(frame: pd.DataFrame, columns: list[str] | None = None, classes: pd.Series | None = None) -> str:
    """A sortable HTML table; each cell keeps its exact value in ``data-v`` for sorting."""
    if frame.empty:
        return '<p class="note">no rows</p>'
    cols = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for i, (_, row) in enumerate(frame[cols].iterrows()):
        css = f' class="{html.escape(str(classes.iloc[i]))}"' if classes is not None else ""
        cells_ = "".join(f'<td data-v="{html.escape(str(row[c]))}"{_cell_class(c)}>{html.escape(_fmt(row[c], c))}</td>'
                         for c in cols)
        body.append(f"<tr{css}>{cells_}</tr>")
    return f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _cell_class(column: str) -> str:
    return ' class="reason"' if column == "reason" else ""


def _status_classes(frame: pd.DataFrame) -> pd.Series:
    return frame["status"].map(STATUS_CSS).fillna("") if "status" in frame else None


def _figure(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config=_CONFIG)


def _section(anchor: str, title: str, *parts: str) -> str:
    return f'<h2 id="{anchor}">{html.escape(title)}</h2>' + "".join(parts)


VERDICT_COLUMNS = ["place", "initializer", "lr", "lr_status", "selection_seeds", "seeds", "diverged", "final_eval_mean",
                   "final_eval_ci_low", "final_eval_ci_high", "eval_auc_mean", "best_diff_mean", "best_diff_ci_low",
                   "best_diff_ci_high", "best_p_value", "best_p_holm", "best_mde", "best_tost_p", "trainable_params", "step0_eval_loss_change", "init_seconds",
                   "stats_seconds", "final_update_norm_mean"]
GRID_COLUMNS = ["initializer", "lr", "selection_seeds", "selection_mean", "seeds", "diverged", "final_eval_mean", "final_eval_ci_low", "final_eval_ci_high",
                "eval_auc_mean", "eval_auc_ci_low", "eval_auc_ci_high", "diff_mean", "diff_ci_low", "diff_ci_high",
                "p_value", "p_holm", "is_best_lr", "final_update_norm_mean"]
RUN_COLUMNS = ["initializer", "lr", "seed", "alpha", "use_rslora", "trainable_params", "init_seconds", "stats_seconds",
               "stats_derived", "stats_peak_cpu_extra_bytes", "step0_shift_norm", "step0_delta_rel_norm",
               "step0_eval_loss_change", "final_train_loss", "final_eval_loss", "eval_auc", "final_update_norm",
               "diverged_step", "mean_step_s"]


def _fine_tuning_change(summary: pd.DataFrame, verdict) -> pd.DataFrame:
    """Mean ``delta_rel_norm_*`` and ``delta_stable_rank_*`` per initializer at its chosen lr."""
    columns = sorted(c for c in summary.columns if c.startswith("delta_rel_norm_") or c.startswith("delta_stable_rank_"))
    if not columns or verdict is None:
        return pd.DataFrame()
    chosen = {r["initializer"]: r["lr"] for _, r in verdict.best.iterrows()}
    stage = summary["stage"] if "stage" in summary else pd.Series("selection+evaluation", index=summary.index)
    at_chosen = pd.Series([chosen.get(n) == lr for n, lr in zip(summary["initializer"], summary["lr"])],
                          index=summary.index)
    keep = summary[at_chosen & (stage != "selection")]
    if keep.empty:
        return pd.DataFrame()
    records = []
    for name, g in keep.groupby("initializer"):
        for kind in sorted({c.rsplit("_", 2)[-2] + "_" + c.rsplit("_", 2)[-1] for c in columns if "proj" in c}):
            rel, stable = f"delta_rel_norm_{kind}", f"delta_stable_rank_{kind}"
            if rel in g and g[rel].notna().any():
                records.append({"initializer": name, "lr": chosen[name], "projection": kind, "runs": len(g),
                                "rel_norm_mean": float(g[rel].mean()), "stable_rank_mean": float(g[stable].mean())})
    return pd.DataFrame(records)


def _loss_section(data) -> str:
    """The loss benchmark: configuration, the verdict (sentences and table), bands over seeds,
    the best-lr panel, the magnitude–loss scatter, and every run."""
    s = data.loss_summary
    config = s.iloc[-1]
    lrs = ", ".join(f"{v:g}" for v in sorted(s["lr"].unique())) if "lr" in s else ""
    seeds = ", ".join(str(int(v)) for v in sorted(s["seed"].unique())) if "seed" in s else ""
    scaling = config.get("scaling_mode", "shared")
    meta = (f"<p class='note'>{_e(config.get('model'))}, data {_e(config.get('data'))} "
            f"(sha256 {_e(str(config.get('data_sha256'))[:12])}…), {_e(config.get('steps'))} steps of "
            f"{_e(config.get('batch_size'))} x {_e(config.get('seq_len'))} tokens, r={_e(config.get('rank'))}, scaling "
            f"{_e(scaling)} (alpha {_e(config.get('alpha'))}), AdamW at peak lr {_e(lrs)} "
            f"({_e(config.get('warmup_steps', 0))} warmup steps, then {_e(config.get('schedule', 'constant'))}), "
            f"seeds {_e(seeds)}, "
            f"{_e(config.get('device'))} {_e(config.get('dtype'))} (autocast {_e(config.get('autocast', 'none'))}); "
            f"eval every {_e(config.get('eval_every', '?'))} steps on the same {_e(config.get('eval_blocks'))} held-out "
            f"blocks; base-model eval loss {_e(config.get('base_eval_loss'), '.4f')}. For one seed, every initializer "
            "trains on the same batches in the same order, so differences are paired over seeds.</p>")
    if data.other_loss_configs:
        meta += (f"<p class='note'>loss.jsonl also holds {data.other_loss_configs} other configuration(s); only the "
                 "latest is shown (loss_stats.csv has all).</p>")
    trainable = ({r["initializer"]: int(r["trainable_params"]) for r in s.to_dict("records")
                  if pd.notna(r.get("trainable_params"))} if "trainable_params" in s else {})
    parts = [meta]
    verdict = data.loss_verdict
    if verdict is not None:
        parts.append("<h3>Verdict</h3><ul class='verdict'>" + "".join(
            f"<li>{html.escape(text)}</li>" for text in verdict.sentences.values()) + "</ul>")
        method = (str(verdict.table["interval_method"].dropna().iloc[-1]) if "interval_method" in verdict.table
                  and verdict.table["interval_method"].notna().any() else "t over seeds")
        separate = not bool(verdict.table["selected_on_scored_seeds"].any()) if "selected_on_scored_seeds" in \
            verdict.table else False
        parts.append("<p class='note'>± is the half-width of a 95 % interval of the paired difference to "
                     f"{html.escape(verdict.reference or 'the reference')} at each one's chosen lr "
                     f"({html.escape(method)}: where the rows hold every eval block's loss, the eval set's own "
                     "sampling error is in it); p is Holm-adjusted over the initializers (p_holm), best_mde the "
                     "difference the test detects with 80 % power, best_tost_p the equivalence test within the "
                     "declared margin. Initializers share a place where no paired interval separates them. "
                     + ("The lrs were chosen on separate selection seeds. " if separate else
                        "The lrs were chosen on the same seeds they are scored on, which flatters the winner. ")
                     + "A chosen lr at an edge of the grid is marked provisional (lr_status).</p>")
        parts.append(table_html(verdict.best, VERDICT_COLUMNS))
        parts.append(_figure(figures.best_lr(verdict.table)))
    curves = data.loss
    if "step0_eval_loss" in s and {"lr", "seed"} <= set(s.columns):  # every eval curve starts at its step-0 eval
        start = s[["initializer", "lr", "seed", "step0_eval_loss"]].rename(columns={"step0_eval_loss": "eval_loss"})
        curves = pd.concat([start.assign(step=0, update_norm=0.0), data.loss], ignore_index=True)
    parts.append(_figure(figures.loss_bands(curves, "eval_loss", "Held-out eval loss", "eval loss", trainable)))
    parts.append(_figure(figures.loss_bands(data.loss, "train_loss", "Train loss per step", "train loss", trainable)))
    parts.append(_figure(figures.loss_bands(curves, "update_norm", "Update magnitude Σ‖W_eff(t) − W_eff(0)‖_F",
                                            "Σ ‖ΔW‖_F", trainable)))
    changed = _fine_tuning_change(s, verdict)
    if not changed.empty:
        parts.append("<h3>What fine-tuning changed</h3><p class='note'>Per projection type, over its layers and the "
                     "scored runs at each initializer's chosen lr: ‖ΔW‖_F/‖W‖_F and the stable rank ‖ΔW‖_F²/‖ΔW‖_2² "
                     "of ΔW = W_eff(T) − W_eff(0). The layer task's default target scale and spectrum are set from "
                     "this measurement.</p>" + table_html(changed))
    if verdict is not None:
        parts.append(_figure(figures.magnitude_scatter(s, verdict.magnitude)))
        parts.append(table_html(verdict.magnitude))
        parts.append("<h3>Every learning rate</h3>" + table_html(verdict.table, GRID_COLUMNS))
    parts.append("<h3>Every run</h3>" + table_html(s, RUN_COLUMNS))
    return "".join(parts)


LAYER_VERDICT_COLUMNS = ["shape", "alignment", "target_rank", "target_scale", "place", "initializer", "lr", "lr_status",
                         "selection_seeds", "seeds", "diverged", "final_eval_mean", "final_eval_ci_low",
                         "final_eval_ci_high", "capacity_floor_mean", "reach", "progress_fraction_mean",
                         "best_diff_mean", "best_diff_ci_low", "best_diff_ci_high", "best_p_holm", "best_mde",
                         "best_tost_p", "trainable_params", "init_seconds", "stats_seconds"]
MAGNITUDE_COLUMNS = ["shape", "alignment", "target_rank", "target_scale", "initializer", "gain", "lr", "matched_noise_lr", "first_step_norm",
                     "matched_first_step_norm", "first_step_ratio", "loss_mean", "matched_loss_mean", "diff_mean",
                     "diff_ci_low", "diff_ci_high", "p_value", "seeds", "rho_within", "rho_p"]


def _layer_cost(rows: pd.DataFrame) -> pd.DataFrame:
    """Per shape: the median training step, the training phase's peak memory, and the
    initializers' measured init time (how each init was obtained)."""
    needed = {"init_method", "init_cached", "init_seconds", "median_step_s", "train_peak_cpu_extra_bytes"}
    ok = rows[rows["status"] == "ok"]
    if ok.empty or not needed <= set(ok.columns):
        return pd.DataFrame()
    ok = ok.assign(shape=ok["d_out"].astype(str) + "x" + ok["d_in"].astype(str), numel=ok["d_out"] * ok["d_in"])
    records = []
    for (numel, shape), g in ok.groupby(["numel", "shape"], sort=True):
        computed = g[(g["init_method"] == "computed") & ~g["init_cached"].astype(bool)]
        inits = {n: float(v.median()) for n, v in computed.groupby("initializer")["init_seconds"]}
        known = sorted(set(g.loc[g["init_method"] == "known-svd", "initializer"]))
        records.append({
            "shape": shape, "runs": len(g), "median_step_s": float(g["median_step_s"].median()),
            "train_peak_cpu_extra_bytes": float(g["train_peak_cpu_extra_bytes"].max()),
            "init_seconds (computed, median)": ", ".join(f"{n} {v:.2f}" for n, v in sorted(inits.items())),
            "from the known SVD": ", ".join(known)})
    return pd.DataFrame(records)


def _size_sweep(table: pd.DataFrame) -> pd.DataFrame:
    """The verdict rows of the (target rank, scale) cell measured at the most shapes: the
    size figures compare one problem across shapes, not the plane's cells."""
    if not {"target_rank", "target_scale"} <= set(table.columns):
        return table
    counts = table.groupby(["target_rank", "target_scale"], dropna=False)["shape"].nunique()
    if counts.empty or counts.max() < 2:
        return pd.DataFrame()
    rank, scale = counts.idxmax()
    return table[(table["target_rank"] == rank) & (table["target_scale"] == scale)]


def _layer_section(data) -> str:
    """The layer-level task: configuration, findings, error and difference against layer size,
    per-step curves, the verdict per shape and alignment, the cost of a step, failures."""
    verdict, rows = data.layer, data.layer_rows
    first = rows.iloc[-1]
    spec = {k[5:]: first[k] for k in rows.columns if k.startswith("spec_")}
    meta = (f"<p class='note'>A frozen W per layer shape and seed (a Marchenko-Pastur bulk plus "
            f"{_e(spec.get('top_directions'))} singular values above it, σ_1 = "
            f"{_e(1 + spec['top_strength'] if isinstance(spec.get('top_strength'), (int, float)) else None, 'g')}× the "
            f"bulk edge), a rank-{_e(spec.get('target_rank'))} target ΔW* with ‖ΔW*‖_F = {_e(spec.get('target_scale'))}·"
            f"‖W‖_F in W's top singular subspace (aligned), a random one, or W's null directions (bottom), and "
            f"{_e(spec.get('input_spectrum'))} inputs. r = {_e(first.get('rank'))}, {_e(first.get('steps'))} AdamW steps "
            f"on {_e(first.get('gradients'))} gradients; the loss is ‖(W_eff − W − ΔW*)Σ^½‖² / ‖ΔW*Σ^½‖² (1: no "
            "progress). Every initializer of one seed trains on the same problem: differences are paired over "
            "seeds.</p>")
    if data.other_layer_configs:
        meta += (f"<p class='note'>layer_loss.jsonl also holds {data.other_layer_configs} other configuration(s); "
                 "only the latest is shown (layer_loss_stats.csv has all).</p>")
    parts = [meta]
    if verdict is not None:
        if verdict.findings:
            parts.append("<h3>Findings</h3><ul class='verdict'>" + "".join(
                f"<li>{html.escape(f.text)}</li>" for f in verdict.findings) + "</ul>")
            parts.append("<p class='note'>Size: the slope of the per-seed paired difference (each at its best lr "
                         "per shape) on log10(m·n), with its 95 % Student-t interval over the (shape, seed) points. "
                         "Alignment: the mean paired difference per alignment over shapes and seeds, and the contrast "
                         "aligned − random per (shape, seed). Shapes are fixed: the intervals cover the measured "
                         "shapes, not others.</p>")
        table = verdict.table()
        reference = (verdict.configs[0].verdict.reference if verdict.configs else "") or "the reference"
        plane = verdict.plane
        if not plane.empty and (plane.groupby(["shape", "alignment"])[["target_rank", "target_scale"]]
                                .apply(lambda g: len(g.drop_duplicates())) > 1).any():
            parts.append("<h3>The (target rank, target scale) plane</h3>"
                         f"<p class='note'>Per initializer, where it wins and loses against {_e(reference)}: the "
                         "paired difference over the evaluation seeds at each one's chosen lr (Holm-adjusted over the "
                         "initializers of a cell). \"as good as\" needs the equivalence test within the declared "
                         "margin; \"not told apart\" says only that nothing was resolved (the hover gives what could "
                         "have been: the MDE). (edge): a chosen lr at the edge of the grid, provisional.</p>")
            parts.append(_figure(figures.layer_plane(plane, reference)))
        parts.append(_figure(figures.layer_floors(verdict.frame)))
        if not table.empty:
            sizes = _size_sweep(table)
            if not (table["is_best_lr"] & (table["initializer"] != reference)).any():
                parts.append(f"<p class='note'>No difference to {_e(reference)} to draw: these runs hold no other "
                             "initializer.</p>")
            if not sizes.empty:
                parts.append(_figure(figures.layer_error_by_size(sizes)))
                if (sizes["is_best_lr"] & (sizes["initializer"] != reference)).any():
                    parts.append(_figure(figures.layer_diff_by_size(sizes, reference)))
        if not verdict.magnitude.empty:
            parts.append("<h3>Magnitude by intervention</h3><p class='note'>LoRAM at gain c·β (c = 1: the paper's) "
                         "at its chosen lr, and noise-zeros at the lr whose first AdamW step moves W_eff as far "
                         "(lr · β·√3·√(1+n/m); the first-step ratio shows the match). If the update magnitude alone "
                         "drove the loss, the paired difference would be 0 at every gain. ρ: Spearman's between final "
                         "update magnitude and final error within the initializer, over its arms and seeds.</p>")
            parts.append(_figure(figures.layer_magnitude(verdict.magnitude, reference)))
            parts.append(table_html(verdict.magnitude, MAGNITUDE_COLUMNS))
        ok = verdict.frame[verdict.frame["arm"] == ""]
        parts.append(_figure(figures.layer_curves(ok)))
        if not table.empty:
            parts.append("<h3>Per configuration, each initializer at its chosen lr</h3>"
                         + table_html(table[table["is_best_lr"]], LAYER_VERDICT_COLUMNS))
    cost = _layer_cost(rows)
    if not cost.empty:
        parts.append("<h3>Cost of the task</h3><p class='note'>A step never forms an m x n matrix: its work is "
                     "O((m+n)·(2r+k)²). Init times are those of the reference implementations on this machine "
                     "(the init benchmark measures them properly); full-SVD PiSSA is taken from W's known singular "
                     "vectors where its SVD was predicted past the init limit.</p>" + table_html(cost))
    bad = rows[rows["status"] != "ok"]
    if not bad.empty:
        parts.append("<h3>Runs without a result</h3>" + table_html(
            bad, ["initializer", "d_out", "d_in", "alignment", "lr", "seed", "status", "phase", "reason"],
            classes=_status_classes(bad)))
    return "".join(parts)


#: How ``loram-bench compare`` decides (the default note of the comparison table).
COMPARE_NOTE = ("ratio = NEW / BASE of the median; p from a two-sided Mann-Whitney U test on the raw values; flagged "
                "only when significant and beyond the threshold.")
VERDICT_CSS = {"slower": "bad", "more memory": "bad", "slower, more memory": "bad", "faster": "good",
               "less memory": "good", "faster, less memory": "good", "unmeasurable": "warn", "not confirmed": "warn"}


SHARDED_COLUMNS = ["initializer", "shape", "world_size", "placement", "device", "dtype", "threads", "status", "time_s",
                   "first_s", "max_peak_cpu_extra_bytes", "max_peak_gpu_allocated_bytes", "max_bytes_sent",
                   "max_diff", "tolerance", "within_tolerance", "phase", "reason", "run_id"]


def _sharded_section(rows: pd.DataFrame) -> str:
    """Time, per-rank peak memory and bytes sent against world size, and every row."""
    from loram_ref.sharded import SHARDED

    gather = [n for n, spec in SHARDED.items() if spec.gathers_weight]
    classes = _status_classes(rows)
    if "within_tolerance" in rows:
        classes = classes.where(rows["within_tolerance"].ne(False), "bad")
    note = ('<p class="note">Each row: one initializer on a weight spread over N ranks launched by torchrun (gloo on '
            "CPU, nccl on CUDA), held as a DTensor sharded by rows (Shard(0), solid) or columns (Shard(1), dashed). "
            "Time is the slowest rank's, each call started at a barrier; memory is each rank's peak above its entry "
            "during the cold call (the shard itself and the harness's copy of it not counted); bytes are those the "
            "method's collectives send per rank under the ring schedule. "
            + (f"{', '.join(gather)} is the baseline PEFT runs under ZeRO-3: every rank gathers the whole weight "
               "and decomposes it. " if gather else "")
            + "max_diff is the largest max|sharded − single-process| / max|single-process| of A, B and the residual "
              "(red when above the tolerance the initializer states). On CPU the ranks share the machine's cores "
              "(threads per rank = cores / ranks), so time against world size shows communication and contention, "
              "not a speed-up.</p>")
    return (note + _figure(figures.sharded_scaling(rows, "time")) + _figure(figures.sharded_scaling(rows, "memory"))
            + _figure(figures.sharded_scaling(rows, "bytes")) + table_html(rows, SHARDED_COLUMNS, classes=classes))


def build_report(results: Path, out: Path, comparison: pd.DataFrame | None = None, title: str = "loram-bench report",
                 speedup_reference: str = SPEEDUP_REFERENCE, comparison_note: str = COMPARE_NOTE) -> Path:
    """Write the report of a results folder (or an init.jsonl) to ``out``; return its path.

    ``speedup_reference`` is the initializer whose time the speedup chart divides by;
    ``comparison_note`` says how the ``comparison`` table was decided.
    """
    data = load_results(results)
    sections = render_sections(data, comparison, speedup_reference, comparison_note)
    nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in sections)
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='note'>generated {generated} from {html.escape(str(results))}; "
        "hover a point for exact figures, pick views in the dropdowns, click table headers to sort.</p>"
        f"<nav>{nav}</nav>" + "".join(_section(a, t, body) for a, t, body in sections)
        + f"<script>{_SORT_JS}</script></body></html>"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _metric_legend() -> str:
    items = "".join(f"<li><code>{html.escape(m.name)}</code> ({html.escape(m.unit)}): {html.escape(m.label)}; "
                    f"processes merge by {m.merge.value}</li>" for m in METRICS)
    return f'<details class="note"><summary>columns</summary><ul>{items}</ul></details>'


def _link(anchor: str | None, text: str, present: set[str]) -> str:
    """``text`` (escaped already) linked to the section that backs it, where the page has it."""
    return f'<a href="#{anchor}">{text}</a>' if anchor in present else text


def _summary_section(summary: pd.DataFrame, present: set[str]) -> str:
    """The decision summary: one row per initializer, each cell linked to its evidence."""
    presets = [c.removeprefix("init time ") for c in summary.columns if c.startswith("init time ")]
    head = ["initializer", *(f"init time {p}" for p in presets), *(f"peak memory {p}" for p in presets),
            *FACT_COLUMNS, "sharded version", "x floor", "loss verdict", "layer task"]
    rows = []
    for row in summary.to_dict("records"):
        cells_ = [f"<td>{_e(row['initializer'])}</td>"]
        for p in presets:
            t, share = row.get(f"init time {p}"), row.get(f"predicted share {p}") or 0.0
            text = "" if t is None or pd.isna(t) else figures.human_seconds(t) + (f" (~{share:.0%} predicted)" if share > 0.005 else "")
            cells_.append(f"<td>{_link('totals', html.escape(text), present)}</td>")
        for p in presets:
            peak = row.get(f"peak memory {p}")
            text = "" if peak is None or pd.isna(peak) else figures.human_bytes(peak)
            cells_.append(f"<td>{_link('memory', html.escape(text), present)}</td>")
        for key in FACT_COLUMNS:
            cells_.append(f"<td>{_link('facts', _e(row.get(key, '')), present)}</td>")
        cells_.append(f"<td>{_link('sharded' if row['sharded version'] != 'no' else 'facts', _e(row['sharded version']), present)}</td>")
        ratios = row.get("x floor")
        text = "" if not isinstance(ratios, tuple) else (f"{ratios[0]:.3g}x" if abs(ratios[1] - ratios[0]) < 0.05 * ratios[0]
                                                          else f"{ratios[0]:.3g}x–{ratios[1]:.3g}x")
        cells_.append(f"<td>{_link('floor', html.escape(text), present)}</td>")
        cells_.append(f'<td class="reason">{_link("loss", _e(row["loss verdict"]), present)}</td>')
        cells_.append(f'<td class="reason">{_link("layer-loss", _e(row.get("layer task", "")), present)}</td>')
        rows.append("<tr>" + "".join(cells_) + "</tr>")
    table = ('<div class="scroll"><table class="sortable"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
             + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")
    note = ('<p class="note">For each model measured: the whole-model init time (every linear layer initialized once, '
            "its layer shapes' times × counts, in the view with the most cells; ~ marks the share predicted by a cost "
            "law) and the largest peak memory of one layer's init beyond its weight. Whether the method needs "
            "statistics from training data, whether it rewrites the frozen weight (then the trained adapter needs its "
            "residual base, or a conversion), whether it has a sharded version, its distance from the hardware floor "
            "(median time over the floor, the range over its cells), the loss verdict sentence, and its layer-task "
            "outcomes against PEFT's default over every measured configuration. Each cell links to the section that "
            "backs it.</p>")
    facts = ('<p class="note" id="facts">' + ", ".join(FACT_COLUMNS) + " and sharded version are facts of each "
             "method's registry entry (its invariant class, statistics kind, cost class and PEFT's name for it), not "
             "measurements.</p>")
    return note + table + facts


def render_sections(data: ResultSet, comparison: pd.DataFrame | None,
                    speedup_reference: str = SPEEDUP_REFERENCE, comparison_note: str = COMPARE_NOTE
                    ) -> list[tuple[str, str, str]]:
    sections: list[tuple[str, str, str]] = []
    if comparison is not None and not comparison.empty:
        verdict_css = comparison["verdict"].map(VERDICT_CSS).fillna("")
        sections.append(("comparison", "Comparison with the baseline",
                         f'<p class="note">{html.escape(comparison_note)}</p>' + table_html(comparison, classes=verdict_css)))
    init = data.init
    if not init.empty:
        laws = cost_laws(init)
        table = cells(init, laws)
        sections.append(("time", "Init time", _figure(figures.init_time(table, laws))))
        failed = failures(init)
        if not failed.empty:
            counts = failed["status"].value_counts().to_dict()
            sections.append(("failures", "Failures and skipped cells",
                             f'<p class="note">{len(failed)} cells were not measured: '
                             + ", ".join(f"{n} {_e(k)}" for k, n in sorted(counts.items()))
                             + ". Failed cells (red) are drawn as crosses at the time their cost law predicts, skipped "
                               "ones (yellow) as hollow circles; a cell without a law is not drawn.</p>"
                             + '<div id="failure-table">' + table_html(failed, FAILURE_COLUMNS, classes=_status_classes(failed))
                             + "</div>"))
        fid_cols = [c for c in init.columns if c.startswith("fidelity_")]
        if fid_cols:
            fid = table[table[fid_cols].notna().any(axis=1)]
            parts = ['<p class="note">How far each approximate method is from the exact computation it stands for, '
                     "computed once per cell after the timings (on the harness's Gaussian weights: a flat spectrum, "
                     "the hardest case for subspace iteration). angle_deg: largest principal angle to the exact "
                     "subspace; energy_ratio: captured energy over the Eckart–Young optimum; eig_residual: "
                     "max ‖Ωq − λq‖/‖Ω‖ of LoRA-DA's eigensolver.</p>"]
            if any(c.startswith("fidelity_angle_deg_niter") for c in fid_cols):
                parts.append(_figure(figures.fidelity_by_niter(fid)))
            parts.append(table_html(fid, ["initializer", "shape", "rank", "dtype", "threads", *sorted(fid_cols)]))
            sections.append(("fidelity", "Fidelity of approximate methods", "".join(parts)))
        sp = speedups(table, speedup_reference)
        label = INITIALIZERS[speedup_reference].label if speedup_reference in INITIALIZERS else speedup_reference
        if not sp.empty:
            sections.append(("speedup", f"Speedup over {label}", _figure(figures.speedup(sp, label))))
        else:
            sections.append(("speedup", f"Speedup over {label}",
                             f'<p class="note">no speedup chart: {html.escape(speedup_reference)} has no measured or '
                             'predicted time in these results.</p>'))
        sections.append(("memory", "Peak memory", _figure(figures.memory(table))))
        if "floor_ratio" in table and table["floor_ratio"].notna().any():
            calib_cols = sorted(c for c in init.columns if c.startswith("calib_"))
            calib = init.dropna(subset=calib_cols).drop_duplicates(["device", "dtype", "threads"])
            sections.append(("floor", "Distance from the hardware",
                             '<p class="note">Each initializer declares the bytes it must read, read and write back, and '
                             "the flops it must do (loram_ref/work.py); the run measured this machine's read and "
                             "read-write bandwidth and rank-16 and square GEMM throughput per device and dtype "
                             "(bench/calibrate.py). The floor is the time those would take; 1x means the method runs "
                             "at the machine's limit, 10x that 90 % of its time is overhead. For the decompositions "
                             "the floor assumes GEMM speed, which an SVD never reaches.</p>"
                             + _figure(figures.roofline(table))
                             + table_html(calib, ["device", "dtype", "threads", *calib_cols])))
        if not laws.empty:
            shown = laws.drop(columns=["family"]).assign(exponent=laws["exponent"].round(3), r2=laws["r2"].round(4))
            sections.append(("laws", "Fitted cost laws t = c·x^k",
                             '<p class="note">least squares in log-log space over the three largest measured sizes; x is '
                             'each algorithm\'s size variable (m·n·min(m,n) for a full SVD, n²(m+n) for LoRA-DA, m·n '
                             'otherwise), so k ≈ 1 means the nominal complexity and k &lt; 1 that per-call overhead still '
                             'dominates. Skipped or failed cells and model totals use t = linear_coefficient·x, fitted at '
                             'the largest measured size.</p>'
                             + table_html(shown)))
            totals = model_totals(table, laws, data.catalog)
            if not totals.empty:
                missing = without_totals(init, laws)
                note = ('<p class="note">no total for ' + html.escape(", ".join(missing))
                        + ": no measured cell to fit a cost law to.</p>") if missing else ""
                sections.append(("totals", "Model-level totals", _figure(figures.totals(totals)) + note))
            elif not data.catalog:
                sections.append(("totals", "Model-level totals",
                                 '<p class="note">no shape catalog (catalog.json) in this results folder: '
                                 '<code>loram-bench run</code> writes one.</p>'))
        cuda_note = ""
        if "cuda_event_gap" in init and init["cuda_event_gap"].notna().any():
            cuda_note = (f'<p class="note">CUDA event cross-check: the largest |event − wall| / wall of any cell is '
                         f'{init["cuda_event_gap"].max():.3g} (column cuda_event_gap).</p>')
        sections.append(("rows", "All init rows", cuda_note + table_html(init, ROW_COLUMNS, classes=_status_classes(init))
                         + _metric_legend()))
    if not data.layer_rows.empty:
        sections.append(("layer-loss", "Layer-level loss", _layer_section(data)))
    if not data.loss.empty:
        sections.append(("loss", "Short-run loss", _loss_section(data)))
    if not data.sharded.empty:
        sections.append(("sharded", "Sharded init (torch.distributed)", _sharded_section(data.sharded)))
    if not data.history.empty:
        sections.append(("history", "History", _figure(figures.history_trend(data.history))))
    env_source = init if not init.empty else (data.loss_summary if not data.loss_summary.empty else data.sharded)
    if not env_source.empty:
        env = env_source.iloc[-1]
        env_frame = pd.DataFrame({"field": [c for c in ENV_COLUMNS if c in env.index],
                                  "value": [_fmt(env[c]) for c in ENV_COLUMNS if c in env.index]})
        sections.append(("environment", "Environment", table_html(env_frame)))
    if not sections:
        sections.append(("empty", "No results", '<p class="note">the results folder holds no rows yet</p>'))
        return sections
    table = cells(init, cost_laws(init)) if not init.empty else pd.DataFrame()
    laws = cost_laws(init) if not init.empty else pd.DataFrame()
    totals = model_totals(table, laws, data.catalog) if not table.empty and not laws.empty else pd.DataFrame()
    summary = decision_summary(data, table, totals)
    if not summary.empty:
        present = {anchor for anchor, _, _ in sections} | {"facts"}
        sections.insert(0, ("summary", "Decision summary", _summary_section(summary, present)))
    return sections


