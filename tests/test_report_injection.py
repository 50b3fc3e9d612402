"""A results folder is data: a script planted in any of its string fields never runs.

The folder holds every kind of row, written by the real commands (``conftest.planted_runs``:
init cost, layer-level loss, sharded init, the gate's history and decisions) and by a loss
run on a tiny model, plus the shape catalog. Every string field of every row that the
reader accepts gets a payload appended (script tags, event handlers, a ``</script>``
breakout); a field whose check refuses the payload (a dtype, a status, an option object)
is shown to be refused and left as it was. The page is rendered in headless Chromium, the
plotly figures are hovered, and nothing the payload would set may appear.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.core.results import ResultsFileError, read_rows
from bench.core.rows import check_row

from .test_report import _chromium

MARK = "document.documentElement.setAttribute('data-pwned', '{}')"
PAYLOAD = (f"\"'><img src=x onerror=\"{MARK.format('img')}\"><svg onload=\"{MARK.format('svg')}\"></svg>"
           f"<script>{MARK.format('script')}</script></script><script>{MARK.format('breakout')}</script>"
           f"<a href=\"javascript:{MARK.format('href')}\">x</a>")
#: Fields left alone: the row kind (another kind is not read at all) and the versions.
UNTOUCHED = {"kind", "schema_version"}


def _poison(value):
    """Every string inside ``value`` (nested objects and lists too) with the payload appended."""
    if isinstance(value, str):
        return value + PAYLOAD
    if isinstance(value, list):
        return [_poison(v) for v in value]
    if isinstance(value, dict):
        return {k: _poison(v) for k, v in value.items()}
    return value


def _poison_row(row: dict) -> tuple[dict, list[str]]:
    """The row with every field poisoned that its check accepts poisoned; the fields refused."""
    out, refused = dict(row), []
    for key, value in row.items():
        if key in UNTOUCHED or _poison(value) == value:
            continue
        trial = {**out, key: _poison(value)}
        if check_row(trial) is None:
            out = trial
        else:
            refused.append(key)
    return out, refused


def _poison_file(path: Path) -> dict[str, int]:
    """Poison every row of a JSONL file in place; count the fields refused, by name."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    refused: dict[str, int] = {}
    poisoned = []
    for row in rows:
        new, bad = _poison_row(row)
        poisoned.append(new)
        for key in bad:
            refused[key] = refused.get(key, 0) + 1
    path.write_text("".join(json.dumps(r) + "\n" for r in poisoned))
    return refused


def _results(planted_runs, tmp_path: Path, corpus_file: Path) -> tuple[Path, list[dict]]:
    from bench.loss.model import tiny_llama_source
    from bench.loss.run import LossConfig, run_loss

    assert all(r.returncode == 0 for r in planted_runs.runs.values())
    folder = tmp_path / "res"
    shutil.copytree(planted_runs.folder / "results", folder)
    gate = planted_runs.folder / "results-gate"
    history = [json.loads(line) for line in (gate / "history.jsonl").read_text().splitlines()]
    change = {**history[-1], "kind": "change", "verdict": "slower", "time_ratio": 1.5, "confirm_low": 1.4,
              "confirm_high": 1.6, "memory_ratio": 1.0, "base_commit": history[-1]["git_commit"]}
    (folder / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*history, change]))
    run_loss(LossConfig(initializers=["noise_zeros", "loram_dst"], seeds=[0, 1], lrs=[1e-3], steps=2, batch_size=2,
                        seq_len=16, eval_every=1, eval_blocks=2, data=corpus_file), folder, progress=False,
             source=tiny_llama_source())
    return folder, json.loads((gate / "gate.json").read_text())


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_a_script_in_any_results_field_never_runs_in_the_report(planted_runs, tmp_path, corpus_file):
    from bench.cli.report import gate_table
    from reports.html import build_report

    folder, decisions = _results(planted_runs, tmp_path, corpus_file)
    files = sorted(folder.glob("*.jsonl"))
    assert {p.name for p in files} >= {"init.jsonl", "layer_loss.jsonl", "sharded.jsonl", "loss.jsonl", "history.jsonl"}
    refused = {p.name: _poison_file(p) for p in files}
    # what the checks refuse poisoned is what the code computes with or looks up: never free text
    free_text = {"reason", "initializer", "init_info", "hostname", "cpu_model", "git_commit", "model", "data"}
    assert not free_text & {k for counts in refused.values() for k in counts}, refused
    assert "dtype" in refused["init.jsonl"] and "status" in refused["init.jsonl"]
    catalog = json.loads((folder / "catalog.json").read_text())
    (folder / "catalog.json").write_text(json.dumps(
        {name + PAYLOAD: [{**s, "role": s["role"] + PAYLOAD} for s in shapes] for name, shapes in catalog.items()}))
    for path in files:  # every poisoned file still reads
        read_rows(path)
    comparison = gate_table([_poison_row(d)[0] if isinstance(d, dict) else d for d in decisions]).assign(
        detail=lambda f: f["detail"].astype(str) + PAYLOAD)
    page = build_report(folder, tmp_path / "report.html", comparison=comparison, title="report" + PAYLOAD,
                        comparison_note="note" + PAYLOAD)
    text = page.read_text()
    assert "<img src=x onerror" not in text and "<svg onload" not in text
    for section in ("Init time", "Layer-level loss", "Short-run loss", "Sharded init", "History", "Comparison"):
        assert f">{section}" in text, section
    state = _render(page, tmp_path)
    assert state["pwned"] is None, f"an injected script ran ({state['pwned']})"
    assert state["errors"] == [] and state["plots"] >= 10 and state["hovered"] > 0, state


def test_a_poisoned_field_the_checks_refuse_stops_the_report_with_its_line(planted_runs, tmp_path):
    from reports.html import build_report

    folder = tmp_path / "res"
    shutil.copytree(planted_runs.folder / "results", folder)
    rows = (folder / "init.jsonl").read_text().splitlines()
    row = json.loads(rows[0])
    (folder / "init.jsonl").write_text("\n".join([json.dumps({**row, "dtype": "float32" + PAYLOAD}), *rows[1:]]) + "\n")
    with pytest.raises(ResultsFileError, match=r"init\.jsonl:1: field 'dtype' must be one of"):
        build_report(folder, tmp_path / "report.html")


def _render(page: Path, tmp_path: Path) -> dict:
    """Open the page in headless Chromium, hover every trace's first point, and read what the
    page's own probe saw: the payload's mark (if any script of it ran), errors, plots."""
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", """<script>
      window.__errors = [];
      window.addEventListener('error', function(e){ window.__errors.push(String(e.message)); });
      setTimeout(function(){
        var hovered = 0;
        document.querySelectorAll('.js-plotly-plot').forEach(function(gd){
          (gd.data || []).forEach(function(trace, i){
            try { Plotly.Fx.hover(gd, [{curveNumber: i, pointNumber: 0}]); hovered += 1; } catch (e) {}
          });
        });
        setTimeout(function(){
          document.title = 'PROBE ' + JSON.stringify({pwned: document.documentElement.getAttribute('data-pwned'),
            errors: window.__errors, hovered: hovered, plots: document.querySelectorAll('.js-plotly-plot .main-svg').length});
        }, 500);
      }, 1500);
    </script></body>"""))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--proxy-server=127.0.0.1:9"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
    assert "<title>PROBE " in dom.stdout, dom.stderr[-2000:]
    title = dom.stdout.split("<title>PROBE ", 1)[1].split("</title>", 1)[0]
    assert 'data-pwned="' not in dom.stdout.split("<title>", 1)[0]
    return json.loads(title.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
