"""The weight's spectrum as part of an init cell (``--spectrum``, ``bench.core.weights``).

What must hold: the default (Gaussian) weight and every existing cell key are unchanged; the
spiked weight is the layer task's W, with its top triplets exactly as declared; a spiked cell
is another cell (its own key, labelled in the report); a row's spectrum is checked; the
harness measures on it.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench.core.identity import SPECTRA, cell_key, digest, identity, view_label
from bench.core.rows import check_row
from bench.core.weights import SpikedWeight, gaussian_weight, make_weight
from bench.initcost.runner import Runner
from bench.initcost.tasks import Task
from bench.layer.problem import LayerProblem


def test_the_flat_weight_is_the_harness_weight_it_always_was():
    gen = torch.Generator().manual_seed(5)
    expected = torch.empty(40, 30, dtype=torch.bfloat16).normal_(0.0, 30**-0.5, generator=gen)
    assert torch.equal(gaussian_weight(40, 30, 5, torch.bfloat16), expected)
    assert torch.equal(make_weight(40, 30, 5, "flat", torch.bfloat16), expected)


def test_the_default_spectrum_keeps_every_cell_key():
    task = Task("pissa", 4096, 4096, 16)
    without = {k: v for k, v in identity(task).items() if k != "spectrum"}
    assert cell_key(task) == digest(without)  # the key a cell had before spectra existed
    assert cell_key({"initializer": "pissa", "d_out": 4096, "d_in": 4096, "rank": 16}) == cell_key(task)
    spiked = Task("pissa", 4096, 4096, 16, spectrum="spiked")
    assert cell_key(spiked) != cell_key(task)
    assert view_label(spiked).endswith("spiked W") and "spiked" not in view_label(task)


def test_the_spiked_weight_is_the_layer_tasks_and_its_top_triplets_are_exact():
    w = make_weight(300, 200, 3, "spiked")
    problem = LayerProblem(300, 200, seed=0, spec=LayerProblem(300, 200, 0).spec.__class__(weight_seed=3))
    assert torch.equal(w, problem.weight())
    spiked = SpikedWeight(300, 200, top_directions=32, seed=3)
    s = torch.linalg.svdvals(w.double())
    torch.testing.assert_close(s[:32], spiked.s_top.double(), rtol=1e-5, atol=0)
    assert float(s[32]) < spiked.edge < float(s[31])  # the bulk stays below the edge, the top above it


def test_a_spiked_weight_too_narrow_for_its_directions_is_refused():
    with pytest.raises(ValueError, match="top_directions must be in 1..min"):
        SpikedWeight(40, 30, top_directions=20)
    with pytest.raises(ValueError, match="spectrum must be one of flat, spiked"):
        make_weight(40, 30, 0, "heavy-tailed")


def test_a_rows_spectrum_is_checked():
    row = {"initializer": "pissa", "d_out": 8, "d_in": 8, "status": "ok", "spectrum": "spiked"}
    assert check_row(row) is None
    problem = check_row({**row, "spectrum": "<script>"})
    assert problem is not None and "spectrum" in problem
    assert set(SPECTRA) == {"flat", "spiked"}


def test_the_harness_measures_on_the_spiked_spectrum(tmp_path):
    """On the spiked W the certified Krylov solver certifies (on the flat one it cannot)."""
    tasks = [Task("pissa_krylov", 600, 400, 2, values=1, min_values=1, threads=1, spectrum=spectrum)
             for spectrum in SPECTRA]
    rows = Runner(tmp_path / "init.jsonl", progress=False, calibrate=False).run(tasks)
    by_spectrum = {r["spectrum"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows) and len({r["task_key"] for r in rows}) == 2
    assert json.loads(by_spectrum["spiked"]["init_info"])["svd"] == "krylov"
    assert json.loads(by_spectrum["flat"]["init_info"])["svd"] == "full"
