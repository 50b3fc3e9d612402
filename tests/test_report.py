"""The HTML report: self-contained, plotly inlined once, renders in headless Chromium."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest

from bench.core.catalog import write_catalog
from bench.core.results import append_row
from reports.html import build_report

SHAPES = [(192, 576), (576, 576), (1536, 576), (4096, 4096)]


def _results(folder):
    """A results folder like a real run's: init rows (one skipped), loss rows, history, shape catalog."""
    folder.mkdir(parents=True, exist_ok=True)
    write_catalog(folder, [])  # the built-in presets, as every run writes them
    env = {"git_commit": "abc123", "hostname": "h", "cpu_model": "cpu", "cpu_count": 2, "torch_version": "2.13.0",
           "run_id": "r1", "timestamp": "2026-11-23T05:00:00"}
    for name, scale, power in [("pissa", 1e-10, 1.0), ("loram_dst", 2e-9, 1.0), ("noise_zeros", 1e-9, 0.5)]:
        for i, (m, n) in enumerate(SHAPES):
            x = m * n * (min(m, n) if name == "pissa" else 1)
            t = scale * x**power
            status = "skipped" if (name == "pissa" and m == 4096) else "ok"
            append_row(folder / "init.jsonl", {
                "kind": "init", "task_key": f"{name}-{m}x{n}", "initializer": name, "d_out": m, "d_in": n, "rank": 16,
                "role": "q_proj", "dtype": "float32", "device": "cpu", "threads": 2, "options": "{}", "status": status,
                "values_s": [t, t * 1.01, t * 0.99] if status == "ok" else None, "median_s": t if status == "ok" else None,
                "first_s": t * 2 if status == "ok" else None, "peak_cpu_extra_bytes": 4 * m * n if status == "ok" else None,
                "peak_gpu_allocated_bytes": 0, "peak_gpu_reserved_bytes": 0, "weight_bytes": 4 * m * n,
                "reason": "predicted 99 s > limit 60 s" if status != "ok" else "", **env})
            if status == "ok":
                append_row(folder / "history.jsonl", {"run_id": "r1", "initializer": name, "shape": f"{m}x{n}", "median_s": t,
                                                      "git_commit": "abc123", "machine": "h|cpu|2c|cpu"})
    for name in ["noise_zeros", "loram_dst"]:
        for step in range(1, 6):
            append_row(folder / "loss.jsonl", {"kind": "loss", "config_key": "c1", "initializer": name, "step": step,
                                               "train_loss": 3 - 0.1 * step, "eval_loss": 3 - 0.1 * step if step % 2 == 0 else math.nan,
                                               "update_norm": 0.1 * step})
        append_row(folder / "loss.jsonl", {"kind": "loss_summary", "config_key": "c1", "initializer": name, "model": "tiny",
                                           "data": "text", "data_sha256": "ff" * 32, "steps": 5, "batch_size": 4, "seq_len": 64,
                                           "rank": 8, "alpha": 8, "lr": 1e-3, "seed": 0, "device": "cpu", "dtype": "float32",
                                           "base_eval_loss": 3.0, "final_train_loss": 2.5, **env})
    return folder


def test_report_is_self_contained_with_every_section(tmp_path):
    path = build_report(_results(tmp_path / "res"), tmp_path / "report.html")
    page = path.read_text()
    assert page.count("Plotly.newPlot") >= 7
    assert page.count("* plotly.js v") == 1  # the library inlined once, not per figure
    assert "<script src=" not in page and '<link rel="stylesheet" href="http' not in page  # nothing fetched
    for title in ["Init time", "Speedup over full-SVD PiSSA", "Peak memory", "Fitted cost laws", "Model-level totals",
                  "All init rows", "Short-run loss", "History", "Environment"]:
        assert f">{title}" in page
    assert "llama-3-70b" in page and page.count("updatemenus") >= 1  # totals: a dropdown over presets
    assert 'class="sortable"' in page and "predicted by cost law (skipped)" in page


def test_empty_results_give_a_page(tmp_path):
    (tmp_path / "empty").mkdir()
    page = build_report(tmp_path / "empty", tmp_path / "r.html").read_text()
    assert "No results" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_report_renders_offline_in_headless_chromium(tmp_path):
    path = build_report(_results(tmp_path / "res"), tmp_path / "report.html")
    # Probe appended to a copy: count rendered plots and collect JS errors into the title.
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace("</body>", """<script>
      window.__errors = [];
      window.addEventListener('error', function(e){ window.__errors.push(String(e.message)); });
      setTimeout(function(){
        var plots = document.querySelectorAll('.js-plotly-plot .main-svg').length;
        document.title = 'PROBE ' + JSON.stringify({plots: plots, errors: window.__errors, figures: document.querySelectorAll('.plotly-graph-div').length});
      }, 1500);
    </script></body>"""))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=8000", "--proxy-server=127.0.0.1:9", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = dom.stdout.split("<title>PROBE ", 1)[1].split("</title>", 1)[0]
    state = json.loads(title.replace("&quot;", '"'))
    assert state["errors"] == [] and state["figures"] >= 7 and state["plots"] >= state["figures"]
    assert "Uncaught" not in dom.stderr
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *flags, "--window-size=1300,2400", f"--screenshot={shot}", path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.is_file() and shot.stat().st_size > 50_000  # a rendered page, not a blank one


def test_the_report_opens_with_a_decision_summary_linked_to_its_evidence(tmp_path):
    import re

    from reports.tables import cells, cost_laws, decision_summary, load_results, model_totals

    folder = _results(tmp_path / "res")
    data = load_results(folder)
    laws = cost_laws(data.init)
    table = cells(data.init, laws)
    totals = model_totals(table, laws, data.catalog)
    summary = decision_summary(data, table, totals).set_index("initializer")
    assert sorted(summary.index) == ["loram_dst", "noise_zeros", "pissa"]
    assert summary.loc["pissa", "rewrites W"].startswith("yes") and summary.loc["noise_zeros", "rewrites W"] == "no"
    assert summary.loc["noise_zeros", "needs data"] == "no"
    llama = totals[(totals["preset"] == "llama-2-7b") & (totals["initializer"] == "loram_dst")]["total_s"].iloc[0]
    assert summary.loc["loram_dst", "init time llama-2-7b"] == pytest.approx(llama)
    page = build_report(folder, tmp_path / "r.html").read_text()
    headings = re.findall(r'<h2 id="([a-z-]+)">', page)
    assert headings[0] == "summary"
    summary_html = page[page.index('<h2 id="summary">'):page.index("<h2", page.index('<h2 id="summary">') + 1)]
    for anchor in re.findall(r'<a href="#([a-z-]+)">', summary_html):
        assert anchor in headings or anchor == "facts", anchor  # every link lands on a section of the page
    assert '<a href="#totals">' in summary_html and '<a href="#memory">' in summary_html
