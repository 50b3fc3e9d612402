"""Sharded init (``loram_ref.sharded``, ``bench.sharded``) on CPU with gloo, launched by torchrun.

Three torchrun launches (world sizes 1, 2, 4) run every sharded initializer on every case of
``tests/sharded_check.py``; here the gathered results are compared with the single-process
``loram_ref`` initializers and with each other. Then the harness: one launch of every
initializer (rows, bytes, resume), and one run with planted failures (a raise, a hang, a
SIGKILL on rank 1) that must each cost exactly their own row.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loram_ref
from bench.sharded.launch import ShardedLauncher
from bench.sharded.plugins import PLUGINS_ENV
from bench.core.results import done_keys
from bench.core.rows import SHARDED as SHARDED_ROWS
from bench.sharded.run import ShardedConfig, run_sharded
from bench.sharded.tasks import ShardedTask
from bench.sharded.weights import full_weight, weight_block
from loram_ref.bases import dst_basis, dst_rows
from loram_ref.sharded import SHARDED, Layout

ROOT = Path(__file__).resolve().parent.parent
WORLD_SIZES = (1, 2, 4)
SCALING = 2.0  # what sharded_check.py passes


def _torchrun(world: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = ShardedLauncher()
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                           "--max-restarts=0", *args], cwd=ROOT, env=env or launcher.environment(1),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def gathered(tmp_path_factory) -> dict[int, dict]:
    """Rank 0's gathered results of ``sharded_check.py``, per world size."""
    out = tmp_path_factory.mktemp("sharded")
    results = {}
    for world in WORLD_SIZES:
        proc = _torchrun(world, "tests/sharded_check.py", str(out))
        assert proc.returncode == 0, f"world size {world}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        results[world] = torch.load(out / f"ws{world}.pt")
    return results


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    scale = float(ref.abs().max())
    err = float((x - ref).abs().max())
    return err / scale if scale > 0 else err


def _aligned(a: torch.Tensor, b: torch.Tensor, ref_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each triplet of (A, B) to the sign of the reference's column of B."""
    signs = torch.sign((b.double() * ref_b.double()).sum(dim=0)).to(a.dtype)
    signs[signs == 0] = 1
    return a * signs[:, None], b * signs


def _compare(got: tuple, ref: loram_ref.LoraInit, name: str, dtype: torch.dtype) -> float:
    a, b, residual = got[:3]
    if SHARDED[name].sign_free:
        a, b = _aligned(a, b, ref.B)
    diffs = [_rel(a, ref.A), _rel(b, ref.B)]
    assert (residual is None) == (ref.residual is None)
    if residual is not None:
        diffs.append(_rel(residual, ref.residual))
    return max(diffs)


def test_every_sharded_initializer_is_covered(gathered):
    names = {key[0] for key in gathered[1]}
    assert names == set(SHARDED) and set(SHARDED) <= set(loram_ref.INITIALIZERS)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_gathered_result_equals_one_process(gathered, world):
    """Every initializer, dtype, shape and placement: within the tolerance its spec states."""
    worst: dict[tuple, float] = {}
    for (name, dtype_name, m, n, dim), got in gathered[world].items():
        dtype = getattr(torch, dtype_name.removeprefix("torch."))
        rank = next(r for (mm, nn, r) in [(37, 23, 4), (18, 41, 4), (6, 40, 3)] if (mm, nn) == (m, n))
        ref = loram_ref.INITIALIZERS[name].fn(full_weight(m, n, rank, 7, dtype), rank, SCALING)
        diff = _compare(got, ref, name, dtype)
        worst[(name, dtype_name)] = max(worst.get((name, dtype_name), 0.0), diff)
        assert diff <= SHARDED[name].tolerance[dtype], (
            f"{name} {dtype_name} {m}x{n} Shard({dim}) at world size {world}: {diff:.2e} > "
            f"{SHARDED[name].tolerance[dtype]:.0e}")
    # the float64 runs show the algebra is exact: rounding only
    assert all(v < 1e-12 for (name, dt), v in worst.items() if dt == "torch.float64"), worst


@pytest.mark.parametrize("world", (2, 4))
def test_result_does_not_depend_on_world_size(gathered, world):
    for key, got in gathered[world].items():
        name, dtype_name = key[0], key[1]
        one = gathered[1][key]
        ref = loram_ref.LoraInit(method=name, A=one[0], B=one[1], scaling=SCALING, residual=one[2])
        tol = SHARDED[name].tolerance[getattr(torch, dtype_name.removeprefix("torch."))]
        assert _compare(got, ref, name, None) <= tol, key


def test_noise_and_loram_send_what_their_specs_say(gathered):
    for (name, dtype_name, m, n, dim), got in gathered[4].items():
        if name in ("noise_zeros", "gaussian", "orthogonal"):
            assert got[3] == 0
        elif name.startswith("loram"):
            assert got[3] == 12  # one float64 all-reduced over 4 ranks: 2·3/4·8 bytes
        elif SHARDED[name].gathers_weight:  # the whole weight: (p - 1) padded shards
            item = {"torch.float64": 8, "torch.float32": 4, "torch.bfloat16": 2}[dtype_name]
            chunk = -(-(m if dim == 0 else n) // 4)
            assert got[3] == 3 * chunk * (n if dim == 0 else m) * item


def test_layout_matches_torch_chunk():
    for size in (1, 5, 6, 37, 64):
        for world in (1, 2, 3, 4, 8):
            pieces = torch.arange(size).chunk(world)
            for index in range(world):
                lay = Layout(shape=(size, 3), dim=0, world=world, index=index)
                want = pieces[index].tolist() if index < len(pieces) else []
                assert list(range(lay.start, lay.stop)) == want, (size, world, index)


def test_dst_rows_are_the_basis_rows():
    full = dst_basis(28672, 16, dtype=torch.float64)
    part = dst_rows(28672, 16, 7000, 14336, dtype=torch.float64)
    assert torch.allclose(part, full[7000:14336], rtol=0, atol=1e-15)


def test_weight_blocks_are_slices_of_the_whole_weight():
    whole = full_weight(300, 70, 4, 3, torch.float32)
    assert torch.equal(weight_block(300, 70, 4, 3, (100, 277), (0, 70), torch.float32), whole[100:277])
    assert torch.allclose(weight_block(300, 70, 4, 3, (0, 300), (20, 45), torch.float32), whole[:, 20:45],
                          rtol=1e-6, atol=1e-7)
    s = torch.linalg.svdvals(full_weight(2048, 512, 16, 0, torch.float64))
    assert float(s[15] / s[16]) > 1.05  # the top r+1 stand apart (what makes the SVD comparison meaningful)


def test_config_errors_name_the_parameter():
    base = dict(initializers=["loram_dst"], shapes=[(64, 32)], world_sizes=[2])
    with pytest.raises(ValueError, match="no sharded version of initializer 'lora_da'.*loram_dst"):
        ShardedConfig(**{**base, "initializers": ["lora_da"]}).tasks()
    with pytest.raises(ValueError, match="--world-size"):
        ShardedConfig(**{**base, "world_sizes": [0]}).tasks()
    with pytest.raises(ValueError, match="--rank 40 exceeds"):
        ShardedConfig(**base, rank=40).tasks()
    with pytest.raises(ValueError, match="--shape or --preset"):
        ShardedConfig(**{**base, "shapes": []}).tasks()
    with pytest.raises(ValueError, match="placement"):
        ShardedTask("loram_dst", 8, 8, 2, placement="diagonal")


def test_cli_refuses_bad_input_before_launching(capsys):
    from bench.cli import main

    assert main(["sharded", "--world-size", "2", "--shape", "64x32", "--initializers", "nope"]) == 2
    assert "no sharded version of initializer 'nope'" in capsys.readouterr().err
    assert main(["sharded", "--world-size", "0", "--shape", "64x32"]) == 2
    assert main(["sharded", "--world-size", "2"]) == 2
    assert "--shape or --preset" in capsys.readouterr().err


class _NoLaunch:
    def launch(self, *args, **kwargs):
        raise AssertionError("a finished row was launched again")


@pytest.fixture(scope="module")
def harness_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded-run")
    config = ShardedConfig(initializers=list(SHARDED), shapes=[(40, 24)], world_sizes=[2], rank=4, repeats=2)
    lines: list[str] = []
    rows = run_sharded(config, out, say=lines.append)
    return out, config, rows, lines


def test_harness_rows(harness_rows):
    out, config, rows, lines = harness_rows
    assert len(rows) == 2 * len(SHARDED) and all(r["status"] == "ok" for r in rows), [r["reason"] for r in rows]
    assert len(lines) == 1 + len(rows)  # the launch, then a line per row as it lands
    for r in rows:
        assert r["within_tolerance"] is True and r["max_diff"] <= r["tolerance"]
        assert len(r["peak_cpu_extra_bytes"]) == len(r["bytes_sent"]) == len(r["rank_values_s"]) == 2
        assert r["values_s"] == [max(per_rank[i] for per_rank in r["rank_values_s"]) for i in range(2)]
        assert r["time_s"] > 0 and all(p >= 0 for p in r["peak_cpu_extra_bytes"])
        assert sum(r["local_weight_bytes"]) == r["weight_bytes"] == 40 * 24 * 4
    sent = {(r["initializer"], r["placement"]): r["bytes_sent"] for r in rows}
    assert sent[("loram_dst", "row")] == [8, 8] and sent[("noise_zeros", "col")] == [0, 0]
    assert sent[("pissa", "row")] == [20 * 24 * 4] * 2 and sent[("pissa", "col")] == [12 * 40 * 4] * 2


def test_harness_resumes_without_launching(harness_rows):
    out, config, rows, _ = harness_rows
    again = run_sharded(config, out, launcher=_NoLaunch(), say=lambda _: None)
    assert len(again) == len(rows)


def test_done_keys_retry_failures_and_smaller_limits():
    rows = [{"kind": "sharded", "task_key": "a", "status": "ok"},
            {"kind": "sharded", "task_key": "b", "status": "crashed"},
            {"kind": "sharded", "task_key": "c", "status": "timeout", "limit_s": 60.0}]
    assert done_keys(rows, SHARDED_ROWS, 60.0) == {"a", "c"}
    assert done_keys(rows, SHARDED_ROWS, 120.0) == {"a"}


def test_report_has_the_sharded_panel(harness_rows, tmp_path):
    from reports.html import build_report

    out = harness_rows[0]
    page = build_report(out, tmp_path / "report.html").read_text()
    assert 'id="sharded"' in page and "Sharded init time against world size" in page
    assert "Per-rank peak memory" in page and "Bytes each rank sends" in page


@pytest.fixture()
def registry_kept():
    """The sharded registry as it was after the test: a plugin's initializers leave with it
    (tests that take every registered initializer would run them otherwise)."""
    saved = dict(SHARDED)
    yield
    SHARDED.clear()
    SHARDED.update(saved)


def test_each_failure_costs_its_own_row(tmp_path, monkeypatch, registry_kept):
    """A raise, a hang and a SIGKILL on rank 1: one row each, with its reason; the run goes on."""
    import time

    import psutil

    began = time.time()
    # the ranks import the plugin from its folder (the working folder is off every child's path)
    monkeypatch.setenv(PLUGINS_ENV, "sharded_faults")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    # each failure ends its launch; the next row gets a launch of its own (the run goes on). The
    # limit leaves room for two ranks to start torch on a cold page cache (a 3 s limit timed out
    # the SIGKILL case before its rank got to kill itself)
    config = ShardedConfig(initializers=["raise_on_rank1", "hang_on_rank1", "kill_rank1"],
                           shapes=[(32, 16)], world_sizes=[2], placements=["row"], rank=4, repeats=1, limit_s=10.0)
    rows = {r["initializer"]: r for r in run_sharded(config, tmp_path, say=lambda _: None)}
    assert rows["raise_on_rank1"]["status"] == "failed"
    assert "rank 1" in rows["raise_on_rank1"]["reason"] and "planted failure" in rows["raise_on_rank1"]["reason"]
    assert rows["raise_on_rank1"]["phase"] == "initializer"
    assert rows["hang_on_rank1"]["status"] == "timeout" and "10 s limit" in rows["hang_on_rank1"]["reason"]
    assert len(rows["hang_on_rank1"]["peak_cpu_extra_bytes"]) == 2  # each rank's peak when killed
    assert rows["kill_rank1"]["status"] == "crashed" and "signal 9" in rows["kill_rank1"]["reason"]
    assert len(rows) == 3
    assert list((tmp_path / "sharded-logs").glob("*.log"))  # the failed launches' torchrun output is kept
    left = [p for p in psutil.process_iter(["cmdline", "create_time"])
            if "bench.sharded.worker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= began - 1]
    assert not left, f"ranks outlived their launch: {[p.pid for p in left]}"  # the hung rank was killed too


class _Scripted:
    """A launcher that writes ok rows for the first ``rows`` tasks it is given, then reports ``outcome``."""

    def __init__(self, script):
        self.script, self.calls = list(script), []

    def launch(self, tasks, plan, folder, limit_s, on_poll=None):
        from bench.core.results import append_row
        from bench.sharded.launch import LaunchOutcome
        from bench.sharded.tasks import ShardedRow

        self.calls.append([t.initializer for t in tasks])
        rows, status, died_on = self.script.pop(0)
        for t in tasks[:rows]:
            append_row(Path(plan["results"]), ShardedRow(task=t, status="ok", values_s=[1.0], run_id=plan["run_id"]).to_row())
        if status is None:
            return LaunchOutcome()
        return LaunchOutcome(tasks[died_on].key, status, "scripted", "initializer",
                             before_start=status == "crashed" and rows == 0 and died_on == 0)


def test_a_launch_that_dies_after_its_row_charges_nothing(tmp_path):
    """A rank aborting at exit after the row was written costs no row; the rest is relaunched."""
    config = ShardedConfig(initializers=["loram_dst", "noise_zeros", "gaussian"], shapes=[(16, 8)], world_sizes=[2],
                           placements=["row"], rank=2)
    launcher = _Scripted([(1, "crashed", 0), (2, None, 0)])
    rows = run_sharded(config, tmp_path, launcher=launcher, say=lambda _: None)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert launcher.calls == [["loram_dst", "noise_zeros", "gaussian"], ["noise_zeros", "gaussian"]]


def test_a_failed_row_is_recorded_and_the_launch_resumes_after_it(tmp_path):
    config = ShardedConfig(initializers=["loram_dst", "noise_zeros", "gaussian"], shapes=[(16, 8)], world_sizes=[2],
                           placements=["row"], rank=2)
    launcher = _Scripted([(1, "timeout", 1), (1, None, 0)])
    rows = run_sharded(config, tmp_path, launcher=launcher, say=lambda _: None)
    assert [(r["initializer"], r["status"]) for r in rows] == [("loram_dst", "ok"), ("noise_zeros", "timeout"),
                                                               ("gaussian", "ok")]
    assert launcher.calls[1] == ["gaussian"]


def test_a_launch_that_never_starts_charges_every_row(tmp_path):
    config = ShardedConfig(initializers=["loram_dst", "noise_zeros"], shapes=[(16, 8)], world_sizes=[2],
                           placements=["row"], rank=2)
    rows = run_sharded(config, tmp_path, launcher=_Scripted([(0, "crashed", 0)]), say=lambda _: None)
    assert [r["status"] for r in rows] == ["crashed", "crashed"] and all(r["reason"] == "scripted" for r in rows)
