"""One resume protocol for every row kind: versions with their upgrades, one key shape,
one rule for what counts as done."""

from __future__ import annotations

import json

import pytest

from bench.core import rows as kinds
from bench.core.identity import cell_key, digest
from bench.core.results import append_row, done_keys, read_rows, resume
from bench.sharded.tasks import ShardedTask


def test_every_kind_has_a_version_and_refuses_a_newer_one():
    for spec in kinds.SPECS.values():
        assert spec.version >= 2
        row = {"kind": spec.kind, "schema_version": spec.version + 1}
        with pytest.raises(kinds.RowVersionError, match=f"a {spec.kind} row has schema_version .*upgrade loram-bench"):
            spec.upgrade(row)


def test_a_sharded_row_of_version_2_resumes_under_the_digest_key(tmp_path):
    task = ShardedTask(initializer="loram_dst", d_out=64, d_in=32, world_size=2, placement="row")
    old_key = (f"sharded|{task.initializer}|{task.d_out}x{task.d_in}|r{task.rank}|s{task.scaling:g}|ws{task.world_size}|"
               f"{task.placement}|{task.device}|{task.dtype}|t{task.threads}|seed{task.seed}")
    row = {**task.to_dict(), "kind": "sharded", "schema_version": 2, "task_key": old_key, "status": "ok"}
    path = tmp_path / "sharded.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (read,) = resume(path)
    assert read["schema_version"] == kinds.SHARDED.version == 3 and read["task_key"] == task.key != old_key
    assert done_keys([read], kinds.SHARDED, 300.0) == {task.key}


def test_the_key_shape_is_one_digest():
    ident = {"initializer": "x", "d_out": 1, "d_in": 1, "rank": 1, "scaling": 1.0, "dtype": "float32",
             "device": "cpu", "threads": 2, "options": {}}
    assert cell_key(ident) == digest(ident) and len(digest(ident)) == 16
    key = kinds.LOSS_SUMMARY.key_of({"config_key": "c", "initializer": "x", "lr": 1e-3, "seed": 0})
    assert key == digest({"config_key": "c", "initializer": "x", "lr": 1e-3, "seed": 0})


@pytest.mark.parametrize("spec, status, field", [(kinds.INIT, "skipped", "limit_s"),
                                                 (kinds.LAYER_LOSS, "skipped", "init_limit_s"),
                                                 (kinds.SHARDED, "timeout", "limit_s")])
def test_done_means_ok_or_decided_under_a_limit_at_least_as_large(spec, status, field):
    base = {"kind": spec.kind, "task_key": "k", "initializer": "x", "d_out": 8, "d_in": 8, "rank": 2}
    assert spec.is_done({**base, "status": "ok"}, 10.0)
    assert spec.is_done({**base, "status": status, field: 10.0}, 10.0)
    assert not spec.is_done({**base, "status": status, field: 10.0}, 20.0)  # a larger limit retries it
    for failure in kinds.FAILURES:
        if failure != status:
            assert not spec.is_done({**base, "status": failure, field: 1e9}, 1.0)  # failures are always retried


def test_a_loss_run_is_done_once_its_summary_is_written(tmp_path):
    path = tmp_path / "loss.jsonl"
    summary = {"kind": "loss_summary", "initializer": "x", "config_key": "c", "lr": 1e-3, "seed": 1}
    append_row(path, {"kind": "loss", "initializer": "x", "config_key": "c", "lr": 1e-3, "seed": 1, "step": 1})
    append_row(path, summary)
    assert done_keys(read_rows(path), kinds.LOSS_SUMMARY) == {kinds.LOSS_SUMMARY.key_of(summary)}
