"""``bench.adopt.cost`` (``loram-bench adopt-cost``) on the tiny Llama, each measurement in a
fresh worker process: ours next to PEFT's, the plain conversion checked, and a worker that
runs past its limit costs only its own row."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from bench.adopt.cost import RESULTS_FILE, CostPlan, run_cost, table  # noqa: E402
from bench.adopt.models import tiny_llama, token_ids  # noqa: E402

TARGETS = ("q_proj", "v_proj", "down_proj")


def _plan(tmp_path, methods, **kw) -> CostPlan:
    data = tmp_path / "ids.pt"
    torch.save(token_ids(tiny_llama(), 8, 12), data)
    return CostPlan(model="tiny", methods=tuple(methods), rank=4, alpha=8.0, targets=TARGETS, data=str(data),
                    batch_size=4, threads=1, **kw)


def test_ours_next_to_peft_with_the_plain_conversion(tmp_path):
    rows = run_cost(_plan(tmp_path, ["pissa"]), tmp_path)
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"ours", "peft"} and all(r["status"] == "ok" for r in rows), rows
    ours = by_mode["ours"]
    assert ours["invariant_holds"] is True and ours["layers"] == 6 and ours["plain_rank"] == 8
    assert ours["plain_bytes"] == 2 * ours["adapter_bytes"] and ours["plain_logits_max_abs_diff"] < 1e-4
    assert ours["seconds"] > 0 and by_mode["peft"]["seconds"] > 0
    written = [json.loads(line) for line in (tmp_path / RESULTS_FILE).read_text().splitlines()]
    assert [r["mode"] for r in written] == ["ours", "peft"]
    assert "pissa" in table(rows)


def test_a_worker_past_its_limit_costs_only_its_row(tmp_path):
    rows = run_cost(_plan(tmp_path, ["noise_zeros"], limit_s=0.05, peft=False), tmp_path)
    assert [r["status"] for r in rows] == ["timeout"] and "0.05" in rows[0]["reason"]
    assert len((tmp_path / RESULTS_FILE).read_text().splitlines()) == 1


def test_a_bad_plan_is_refused():
    with pytest.raises(ValueError, match="unknown initializer"):
        CostPlan(model="tiny", methods=("nope",), rank=4, alpha=4.0, targets=TARGETS, data=None)
    with pytest.raises(ValueError, match="rank"):
        CostPlan(model="tiny", methods=("pissa",), rank=0, alpha=4.0, targets=TARGETS, data=None)
