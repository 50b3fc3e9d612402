"""The house: one identity, initializer facts on the registry (the import graph is checked in
``test_architecture``)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import loram_ref
from bench.core import costlaw
from bench.initcost.history import append_history
from bench.core.identity import DEFAULTS, cell_key, family
from bench.core.results import append_row, read_rows
from bench.initcost.runner import Runner
from bench.initcost.tasks import Task
from bench.initcost.worker import run_task
from loram_ref.registry import INITIALIZERS, PASSES, register
from loram_ref.result import LoraInit

ROOT = Path(__file__).resolve().parent.parent


def _ok_row(initializer, d, threads, t):
    task = Task(initializer, d, d, 4, threads=threads)
    return {"kind": "init", "task_key": task.key, **{k: v for k, v in dataclasses.asdict(task).items() if k != "options"},
            "options": "{}", "status": "ok", "values_s": [t, t], "first_s": t, "run_id": "r", "git_commit": "c",
            "hostname": "h", "cpu_model": "m", "cpu_count": 2}


def test_two_thread_counts_stay_two_cells_two_laws_two_lines(tmp_path):
    from reports import figures
    from reports.tables import cells, cost_laws, load_results

    for d in (64, 128, 256):
        append_row(tmp_path / "init.jsonl", _ok_row("loram_dst", d, 1, 2e-6 * d * d))
        append_row(tmp_path / "init.jsonl", _ok_row("loram_dst", d, 2, 1e-6 * d * d))
    data = load_results(tmp_path)
    assert len(data.init) == 6  # six cells, not three
    laws = cost_laws(data.init)
    assert len(laws) == 2 and sorted(laws["linear_coefficient"].round(9)) == [1e-6, 2e-6]
    fig = figures.init_time(cells(data.init, laws), laws)
    lines = [t for t in fig.data if t.name == "loram_dst"]
    assert len(lines) == 2 and {len(t.x) for t in lines} == {3}
    # resume, prediction and history tell them apart too
    rows = read_rows(tmp_path / "init.jsonl")
    runner = Runner(tmp_path / "init.jsonl", progress=False)
    one = Task("loram_dst", 512, 512, 4, threads=1, warmups=0, min_values=1)
    two = dataclasses.replace(one, threads=2)
    assert runner.predict(one, rows) == pytest.approx(2 * runner.predict(two, rows), rel=1e-6)
    assert append_history(rows, tmp_path / "history.jsonl") == 6


def test_identity_defaults_are_the_task_defaults():
    task = Task("x", 1, 1, 1)
    assert all(getattr(task, k) == v for k, v in DEFAULTS.items())
    assert cell_key({"initializer": "x", "d_out": 1, "d_in": 1, "rank": 1}) == cell_key(task) == task.key
    assert family(task) == family(dataclasses.replace(task, d_out=7, d_in=9))


#: Initializer names are chosen in one module (the defaults); every other module of the
#: harness and the report reads facts from the registry.
_NO_NAMES = sorted(str(p.relative_to(ROOT)) for top in ("bench", "reports") for p in (ROOT / top).rglob("*.py")
                   if p.relative_to(ROOT).as_posix() != "bench/core/defaults.py")


@pytest.mark.parametrize("path", _NO_NAMES)
def test_no_initializer_name_is_spelled_outside_the_registry(path):
    tree = ast.parse((ROOT / path).read_text())
    names = set(loram_ref.INITIALIZERS)
    found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names]
    assert found == [], f"{path} names initializers {found}: put the fact on the registry or in bench/core/defaults.py"


def _ninth(weight: torch.Tensor, rank: int, scaling: float = 1.0) -> LoraInit:
    """A made-up ninth initializer: A = 0, B = 0."""
    m, n = weight.shape
    return LoraInit("ninth", A=torch.zeros(rank, n, dtype=weight.dtype), B=torch.zeros(m, rank, dtype=weight.dtype),
                    scaling=scaling)


def test_a_ninth_initializer_needs_only_its_registration():
    register("ninth", invariant=loram_ref.Invariant.ZERO_PRODUCT, paper="-", summary="zeros", cost=PASSES)(_ninth)
    try:
        assert costlaw.size_variable("ninth", 30, 20) == 600 and costlaw.size_variable_name("ninth") == "m·n"
        run = run_task(Task("ninth", 32, 16, 4, threads=1, values=1, value_budget_s=0.1))
        assert run["task_key"] == Task("ninth", 32, 16, 4, threads=1).key and len(run["values_s"]) == 1
        assert run["delta_rel_norm"] == 0.0
    finally:
        INITIALIZERS.pop("ninth")


def test_every_initializer_declares_its_facts():
    for name, spec in loram_ref.INITIALIZERS.items():
        assert spec.cost.size(8, 4) > 0 and spec.label
        if spec.needs_statistics:
            stats = spec.statistics.synthetic(8, 4, torch.Generator().manual_seed(0), "cpu")
            stats.validate((8, 4))
            assert spec.statistics.collect is not None and spec.statistics.default_samples > 0


def test_the_report_never_instantiates_a_model(tmp_path, monkeypatch):
    import bench.core.shapes
    from reports.html import build_report

    from .test_report import _results

    folder = _results(tmp_path / "res")

    def refuse(*_a, **_k):
        raise AssertionError("the report instantiated a model")

    monkeypatch.setattr(bench.core.shapes, "shapes_from_config", refuse)
    page = build_report(folder, tmp_path / "r.html").read_text()
    assert "Model-level totals" in page and "llama-3-70b" in page
