"""The report shows failures and predictions for what they are."""

from __future__ import annotations

import html
import json
import subprocess

import pytest

from bench.core.catalog import write_catalog
from bench.core.results import append_row
from reports import figures
from reports.html import build_report
from reports.tables import cells, cost_laws, load_results, model_totals

from .test_report import _chromium

ENV = {"git_commit": "abc", "hostname": "h", "cpu_model": "cpu", "cpu_count": 2, "run_id": "r1"}
SHAPES = [(64, 64), (128, 128), (4096, 11008), (11008, 4096)]
BROKEN = {("loram_dst", 4096, 11008): ("timeout", "worker exceeded the 60 s limit and was killed", ""),
          ("loram_dst", 11008, 4096): ("crashed", "killed by signal 9 (out of memory?)", ""),
          ("pissa", 4096, 11008): ("oom", "out of memory in the initializer phase: RuntimeError: can't allocate", "initializer"),
          ("pissa", 11008, 4096): ("skipped", "predicted 172 s > limit 60 s", "")}


def _folder(tmp_path):
    folder = tmp_path / "res"
    write_catalog(folder, [])
    for name, c in (("loram_dst", 2e-9), ("pissa", 1e-8)):
        for m, n in SHAPES:
            status, reason, phase = BROKEN.get((name, m, n), ("ok", "", ""))
            t = c * m * n
            append_row(folder / "init.jsonl", {
                "kind": "init", "initializer": name, "d_out": m, "d_in": n, "rank": 16, "dtype": "float32", "device": "cpu",
                "threads": 2, "role": "x", "status": status, "reason": reason, "phase": phase,
                "values_s": [t, t] if status == "ok" else None, "first_s": t if status == "ok" else None,
                "peak_cpu_extra_bytes": 1_339_000 if status == "ok" else None, "weight_bytes": 4 * m * n, **ENV})
    return folder


def test_failures_are_listed_with_status_colour_and_reason(tmp_path):
    page = build_report(_folder(tmp_path), tmp_path / "r.html").read_text()
    assert ">Failures and skipped cells" in page and "4 cells were not measured: 1 crashed, 1 oom, 1 skipped, 1 timeout" in page
    for status, reason, _ in BROKEN.values():
        assert html.escape(reason.split(":")[0]) in page
    assert page.count('<tr class="bad">') >= 2 * 3 and '<tr class="warn">' in page  # failures table and rows table
    assert "1.28 MiB" in page and "1.339e+06" not in page  # memory in MiB, not raw bytes


def test_failed_cells_are_crosses_at_their_predicted_time_and_the_key_explains_the_marks(tmp_path):
    data = load_results(_folder(tmp_path))
    laws = cost_laws(data.init)
    table = cells(data.init, laws)
    fig = figures.init_time(table, laws)
    dst = next(t for t in fig.data if t.name == "loram_dst")
    marks = dict(zip(dst.x, dst.marker.symbol))
    assert marks["4096x11008"] == "x" and marks["11008x4096"] == "x" and marks["64x64"] == "circle"
    pissa = next(t for t in fig.data if t.name == "pissa")
    assert dict(zip(pissa.x, pissa.marker.symbol))["11008x4096"] == "circle-open"
    assert {"measured", "predicted (skipped)", "failed, time predicted", "fitted cost law"} <= {t.name for t in fig.data}
    assert fig.layout.xaxis.type == "category" and list(fig.layout.xaxis.categoryarray).index("4096x11008") < list(
        fig.layout.xaxis.categoryarray).index("11008x4096")  # two shapes with one m·n: two positions


def test_one_colour_per_initializer_in_every_chart(tmp_path):
    data = load_results(_folder(tmp_path))
    laws = cost_laws(data.init)
    table = cells(data.init, laws)
    charts = [figures.init_time(table, laws), figures.memory(table),
              figures.loss_bands(table.assign(step=1, eval_loss=1.0, lr=1e-3, seed=0), "eval_loss", "t", "y")]
    for fig in charts:
        for trace in fig.data:
            name = (trace.name or "").split(" ")[0]
            if name in ("loram_dst", "pissa"):
                assert trace.line.color == figures.color(name)
    assert figures.color("loram_dst") != figures.color("pissa")


def test_totals_open_on_a_measured_model_and_count_failed_cells(tmp_path):
    folder = _folder(tmp_path)
    write_catalog(folder, [])
    data = load_results(folder)
    laws = cost_laws(data.init)
    totals = model_totals(cells(data.init, laws), laws, data.catalog)
    fig = figures.totals(totals)
    first = fig.layout.updatemenus[0].buttons[0].label
    assert first.startswith("llama-2-7b") or first.startswith("llama-2-13b") or "7b" in first  # 4096x11008 was measured
    assert (totals[totals["initializer"] == "loram_dst"]["failed_cells"] > 0).any()


def test_loss_figures_say_how_many_parameters_train():
    import pandas as pd

    loss = pd.DataFrame([{"initializer": n, "step": 1, "eval_loss": 2.0, "lr": 1e-3, "seed": 0} for n in ("lora_sb", "noise_zeros")])
    fig = figures.loss_bands(loss, "eval_loss", "t", "y", {"lora_sb": 13_440, "noise_zeros": 2_442_240})
    assert {t.name for t in fig.data} == {"lora_sb (0.0134 M trainable)", "noise_zeros (2.44 M trainable)"}


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_failure_markings_render_in_headless_chromium(tmp_path):
    path = build_report(_folder(tmp_path), tmp_path / "report.html")
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace("</body>", """<script>
      setTimeout(function(){
        var legend = Array.from(document.querySelectorAll('.legendtext')).map(function(e){ return e.textContent; });
        var failed = Array.from(document.querySelectorAll('#failure-table tr.bad td:nth-child(7)')).map(function(e){ return e.textContent; });
        var points = document.querySelectorAll('.js-plotly-plot .scatterlayer .point').length;
        document.title = 'PROBE ' + JSON.stringify({legend: legend, failed: failed, points: points});
      }, 1500);
    </script></body>"""))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=8000", "--proxy-server=127.0.0.1:9"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = dom.stdout.split("<title>PROBE ", 1)[1].split("</title>", 1)[0]
    state = json.loads(title.replace("&quot;", '"'))
    assert {"failed, time predicted", "predicted (skipped)", "measured", "fitted cost law"} <= set(state["legend"])
    assert sorted(state["failed"]) == ["crashed", "oom", "timeout"]
    assert state["points"] > 0


def test_the_fidelity_section_lists_only_cells_with_a_diagnostic(tmp_path):
    folder = _folder(tmp_path)
    append_row(folder / "init.jsonl", {
        "kind": "init", "initializer": "pissa_rsvd", "d_out": 64, "d_in": 64, "rank": 16, "dtype": "float32",
        "device": "cpu", "threads": 2, "status": "ok", "values_s": [0.1, 0.1], "first_s": 0.1,
        "fidelity_angle_deg_niter0": 80.0, "fidelity_angle_deg_niter4": 10.0, **ENV})
    page = build_report(folder, tmp_path / "r.html").read_text()
    section = page.split('id="fidelity"', 1)[1].split("<h2", 1)[0]
    assert "pissa_rsvd" in section and "loram_dst" not in section and "max_fidelity_elements" not in page
