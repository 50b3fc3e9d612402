"""The layer-level loss task (issue 13): the problem, the factored loss, the statistics,
the worker, the driver's reliability and the findings."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import loram_ref
from bench.layer.factored import AdapterState, exact_loss, sampled_loss, target_norm_sq, train_layer, update_norm
from bench.layer.problem import LayerProblem, ProblemSpec, Target
from bench.layer.run import LayerConfig, predict_init_seconds, run_layer_loss
from bench.layer.task import LayerTask
from bench.layer.verdict import findings, config_verdicts, layer_frame
from bench.layer.worker import compute_init, run_layer_task
from loram_ref import CollectContext, Invariant

from .workers import layer_crash_on_seed_one as _crash_on_seed_one
from .workers import layer_init_fails as _init_fails

SMALL = ProblemSpec(top_directions=8, target_rank=4, target_scale=0.05)
DECAYING = replace(SMALL, input_spectrum="decaying")
NAMES = sorted(n for n, s in loram_ref.INITIALIZERS.items() if s.layer_task_excluded is None)


def _task(name: str, m: int = 48, n: int = 40, **kw) -> LayerTask:
    return LayerTask(initializer=name, d_out=m, d_in=n, seed=kw.pop("seed", 0), lr=kw.pop("lr", 1e-2),
                     alignment=kw.pop("alignment", "random"), rank=kw.pop("rank", 4), spec=kw.pop("spec", SMALL.__dict__),
                     steps=kw.pop("steps", 5), batch_size=kw.pop("batch_size", 16), threads=1, **kw)


def _state(name: str, problem: LayerProblem, target: Target, rank: int = 4) -> tuple[AdapterState, loram_ref.LoraInit]:
    task = _task(name, problem.m, problem.n, rank=rank, alignment=target.alignment,
                 spec=problem.spec.__dict__)
    init, _ = compute_init(task, problem, target)
    spec = loram_ref.get_initializer(name)
    state = AdapterState(init.A, init.B, init.scaling, spec.invariant != Invariant.SHIFTED, init.R,
                         train_b="B" in spec.trains)
    return state, init


# -- the problem ----------------------------------------------------------------------------

def test_the_weight_has_exactly_the_known_top_and_bottom_singular_triplets():
    problem = LayerProblem(64, 48, 3, SMALL)
    w = problem.weight().double()
    s = torch.linalg.svdvals(w)
    t = SMALL.top_directions
    assert torch.allclose(s[:t], problem.s_top.double(), rtol=1e-5)
    assert float(s[t]) < float(problem.s_top[-1])  # the bulk stays below the top
    assert float((w @ problem.v_bottom.double()).norm()) < 1e-5 * float(w.norm())  # V_b: right null directions
    assert float((w.mT @ problem.u_bottom.double()).norm()) < 1e-5 * float(w.norm())
    u, sv, vh = problem.top_triplets(4)
    assert torch.allclose(w @ vh.mT.double(), u.double() * sv.double(), atol=1e-4)


def test_pissa_agrees_with_the_known_svd_where_its_full_svd_runs():
    problem = LayerProblem(72, 56, 1, SMALL)
    w = problem.weight()
    full = loram_ref.initialize("pissa", w, 4, 2.0)
    known = loram_ref.get_initializer("pissa").from_svd(*problem.top_triplets(4), 2.0)
    # each triplet's sign is the SVD routine's choice: compare the rank-1 terms B_i·A_i
    for i in range(4):
        term_full = torch.outer(full.B[:, i], full.A[i])
        term_known = torch.outer(known.B[:, i], known.A[i])
        assert torch.allclose(term_full, term_known, atol=1e-4 * float(term_full.norm()))
    assert torch.allclose(w - 2.0 * known.B @ known.A, full.residual, atol=1e-4)


@pytest.mark.parametrize("alignment", ["aligned", "random", "bottom"])
def test_targets_live_in_their_subspace_with_the_asked_scale(alignment):
    problem = LayerProblem(64, 48, 0, SMALL)
    target = problem.target(alignment)
    dense = target.dense().double()
    k = SMALL.target_rank
    assert math.isclose(float(dense.norm()), SMALL.target_scale * problem.weight_norm, rel_tol=1e-4)
    assert int(torch.linalg.matrix_rank(dense, rtol=1e-5)) == k
    basis = {"aligned": problem.u_top[:, :k], "bottom": problem.u_bottom}.get(alignment)
    if basis is not None:
        inside = basis.double() @ (basis.double().mT @ dense)
        assert torch.allclose(inside, dense, atol=1e-6)
    else:  # a random target has about k/m of its energy in W's top-k directions
        top = problem.u_top[:, :k].double()
        assert float((top.mT @ dense).norm() / dense.norm()) < 0.6


def test_bad_problem_parameters_name_the_flag():
    with pytest.raises(ValueError, match="--target-rank 40 exceeds --top-directions"):
        ProblemSpec(target_rank=40).validate()
    with pytest.raises(ValueError, match="too small"):
        LayerProblem(30, 30, 0, ProblemSpec())
    with pytest.raises(ValueError, match="--alignment must be one of"):
        LayerProblem(64, 48, 0, SMALL).target("sideways")
    with pytest.raises(ValueError, match="--input-spectrum"):
        ProblemSpec(input_spectrum="pink").validate()


# -- the factored loss ----------------------------------------------------------------------

def test_the_loss_is_zero_for_an_adapter_that_equals_the_target():
    problem = LayerProblem(64, 48, 0, SMALL)
    target = problem.target("random")
    s = 2.0
    state = AdapterState(a=target.right.mT, b=target.left / s, scaling=s, preserves_function=False)
    norm = target_norm_sq(target, problem.input_var)
    with torch.no_grad():
        assert float(exact_loss(state, target, problem.input_var, norm)) == pytest.approx(0.0, abs=1e-6)
        x = problem.inputs(32, torch.Generator().manual_seed(0))
        assert float(sampled_loss(state, target, x, norm)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", [n for n in NAMES if loram_ref.get_initializer(n).invariant != Invariant.SHIFTED])
def test_the_loss_is_one_at_step_zero_for_function_preserving_and_zero_product_inits(name):
    problem = LayerProblem(64, 48, 2, SMALL)
    for alignment in ("aligned", "random"):
        target = problem.target(alignment)
        state, _ = _state(name, problem, target)
        norm = target_norm_sq(target, problem.input_var)
        with torch.no_grad():
            assert float(exact_loss(state, target, problem.input_var, norm)) == pytest.approx(1.0, abs=1e-6)
        assert update_norm(state) == 0.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spec", [SMALL, DECAYING], ids=["isotropic", "decaying"])
def test_the_factored_loss_equals_the_dense_one(name, spec):
    problem = LayerProblem(56, 40, 1, spec)
    target = problem.target("aligned")
    state, init = _state(name, problem, target)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move away from step 0, where much of the loss cancels
        for p in state.parameters:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    w = problem.weight().double()
    init_full = compute_init(_task(name, 56, 40, alignment="aligned", spec=spec.__dict__), problem, target)
    p_now = (state.b @ state.middle if state.middle is not None else state.b).detach().double()
    delta = init.scaling * p_now @ state.a.detach().double()
    residual = w - init.scaling * state.p0.double() @ state.a0.double() if state.preserves_function else w
    dense_error = (residual + delta - w - target.dense().double()) * problem.input_var.double().sqrt()[None, :]
    expected = float(dense_error.square().sum()) / float((target.dense().double() * problem.input_var.double().sqrt()).square().sum())
    norm = target_norm_sq(target, problem.input_var)
    with torch.no_grad():
        assert float(exact_loss(state, target, problem.input_var, norm)) == pytest.approx(expected, rel=1e-4)
    probe = init_full[1]["residual_probe_rel_err"]
    if probe is not None:  # the initializer's own residual is the factored model's W − s·P₀·A₀
        assert probe < 1e-5


def test_exact_and_sampled_gradients_agree_in_expectation():
    problem = LayerProblem(48, 40, 0, DECAYING)
    target = problem.target("random")
    gen = torch.Generator().manual_seed(0)
    state = AdapterState(torch.randn(4, 40, generator=gen) * 0.1, torch.randn(48, 4, generator=gen) * 0.1, 1.0, True)
    with torch.no_grad():
        state.b.add_(torch.randn(48, 4, generator=gen) * 0.1)  # a state away from step 0
    norm = target_norm_sq(target, problem.input_var)
    exact_loss(state, target, problem.input_var, norm).backward()
    exact = [p.grad.clone() for p in state.parameters]
    for p in state.parameters:
        p.grad = None
    batches, losses = 400, []
    sums = [torch.zeros_like(p) for p in state.parameters]
    for _ in range(batches):
        loss = sampled_loss(state, target, problem.inputs(64, gen), norm)
        loss.backward()
        losses.append(float(loss))
        for acc, p in zip(sums, state.parameters):
            acc += p.grad
            p.grad = None
    for acc, g in zip(sums, exact):
        assert float((acc / batches - g).norm() / g.norm()) < 0.05
    with torch.no_grad():
        exact_value = float(exact_loss(state, target, problem.input_var, norm))
    assert np.mean(losses) == pytest.approx(exact_value, rel=4 * np.std(losses) / math.sqrt(batches) / exact_value)


class _LargestAllocation(TorchDispatchMode):
    """The largest tensor any op produces while active (forward, backward, optimizer)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_a_70b_shaped_step_never_allocates_an_m_by_n_matrix():
    from bench.core.measure import cpu_peak

    m, n, r = 28672, 8192, 8
    problem = LayerProblem(m, n, 0)  # no weight is built: only its O((m+n)·k) parts
    target = problem.target("random")
    gen = torch.Generator().manual_seed(0)
    state = AdapterState(torch.randn(r, n, generator=gen) * n**-0.5, torch.randn(m, r, generator=gen) * 0.01, 1.0, True)
    train_layer(state, target, problem.input_var, steps=1, lr=1e-3)  # warm-up: optimizer state exists
    tracker = _LargestAllocation()
    with cpu_peak() as peak, tracker:
        curve = train_layer(state, target, problem.input_var, steps=2, lr=1e-3)
    assert tracker.largest < m * n // 100, f"an op produced {tracker.largest} elements"
    assert peak.extra_bytes < 200 << 20  # an m x n fp32 matrix is 940 MB
    assert len(curve.loss) == 3 and all(math.isfinite(v) for v in curve.loss)


# -- statistics from the task's gradients ---------------------------------------------------

def test_lora_sb_statistics_are_the_sign_of_the_first_step_update():
    problem = LayerProblem(48, 40, 0, DECAYING)
    target = problem.target("aligned")
    ctx = CollectContext(batch_size=16, lr=1e-3, num_train=16 * 10)
    stats, meta = loram_ref.Statistics.LORA_SB.from_oracle(problem.oracle(target, exact=True), ctx, 32)
    grad = -2.0 * target.dense() * problem.input_var[None, :]
    assert torch.equal(stats.update, -meta["eta_eff"] * torch.sign(grad))
    assert meta["eta_eff"] == pytest.approx(1e-3 / (0.02 * 10))


def test_lora_da_sampled_statistics_approach_the_exact_ones():
    problem = LayerProblem(48, 40, 0, DECAYING)
    target = problem.target("random")
    ctx = CollectContext(batch_size=16, lr=1e-3, num_train=160)
    exact, _ = loram_ref.Statistics.LORA_DA.from_oracle(problem.oracle(target, exact=True), ctx, 0)
    sampled, meta = loram_ref.Statistics.LORA_DA.from_oracle(problem.oracle(target, exact=False), ctx, 20000)
    assert meta["tokens"] == 20000
    for a, b in ((sampled.grad, exact.grad), (sampled.input_factor, exact.input_factor),
                 (sampled.output_factor, exact.output_factor)):
        assert float((a - b).norm() / b.norm()) < 0.08
    assert torch.equal(exact.input_factor, torch.diag(problem.input_var))


def test_lora_sb_rescaled_equals_a_fresh_init_up_to_bf16_rounding():
    problem = LayerProblem(48, 40, 0, SMALL)
    target = problem.target("aligned")
    spec = loram_ref.get_initializer("lora_sb")
    w = problem.weight()
    inits = {}
    for lr in (1e-3, 3e-3):
        ctx = CollectContext(batch_size=16, lr=lr, num_train=160)
        stats, _ = spec.statistics.from_oracle(problem.oracle(target, exact=True), ctx, 16)
        inits[lr] = spec.fn(w, 4, stats=stats)
    derived = spec.rescale(inits[1e-3], 3.0)
    assert torch.equal(derived.A, inits[3e-3].A) and torch.equal(derived.B, inits[3e-3].B)
    assert torch.allclose(derived.R, inits[3e-3].R, rtol=2**-7)


# -- the worker and the driver --------------------------------------------------------------

def test_a_run_records_its_curve_and_init_facts():
    row = run_layer_task(_task("loram_dst", steps=6))
    assert len(row["loss"]) == 7 and row["loss"][0] == pytest.approx(1.0, abs=1e-6)
    assert row["final_loss"] == row["loss"][-1] and row["diverged_step"] == 0
    assert row["init_method"] == "computed" and row["init_seconds"] > 0 and row["residual_probe_rel_err"] < 1e-5
    assert row["trainable_params"] == 4 * (48 + 40) and row["update_norm"][0] == 0.0
    sb = run_layer_task(_task("lora_sb", steps=3))
    assert sb["trainable_params"] == 16 and sb["stats_eta_eff"] > 0


def test_the_known_svd_path_needs_no_weight_and_matches_the_computed_init():
    task = _task("pissa", steps=4)
    computed = run_layer_task(task)
    known = run_layer_task(replace(task, init_method="known-svd"))
    assert known["init_method"] == "known-svd" and known["init_seconds"] is None
    assert known["loss"] == pytest.approx(computed["loss"], abs=1e-4)
    with pytest.raises(ValueError, match="cannot be taken from a known SVD"):
        run_layer_task(replace(_task("loram_dst"), init_method="known-svd"))


def _small_config(**kw) -> LayerConfig:
    base = dict(shapes=[(48, 40)], initializers=["noise_zeros", "loram_dst"], seeds=[0, 1], lrs=[1e-2, 3e-2],
                steps=4, rank=4, spec=SMALL, threads=1, limit_s=120, bracket=False)
    return LayerConfig(**{**base, **kw})


def test_a_crash_costs_one_row_and_a_rerun_measures_only_that_run(tmp_path):
    rows = run_layer_loss(_small_config(), tmp_path, progress=False, worker_fn=_crash_on_seed_one)
    statuses = [(r["initializer"], r["seed"], r["lr"], r["status"]) for r in rows]
    assert statuses.count(("loram_dst", 1, 1e-2, "crashed")) == 1
    assert sum(1 for s in statuses if s[3] == "ok") == 7
    again = run_layer_loss(_small_config(), tmp_path, progress=False)
    added = again[len(rows):]
    assert [(r["initializer"], r["seed"], r["lr"], r["status"]) for r in added] == [("loram_dst", 1, 1e-2, "ok")]
    assert (tmp_path / "layer_loss_stats.csv").is_file() and not (tmp_path / "layer_cache").exists()


def test_a_failed_init_is_not_retried_for_the_rest_of_its_group(tmp_path):
    log = tmp_path / "out" / "launches.log"
    rows = run_layer_loss(_small_config(seeds=[0]), tmp_path / "out", progress=False, worker_fn=_init_fails)
    failed = [r for r in rows if r["initializer"] == "loram_dst"]
    assert [r["status"] for r in failed] == ["failed", "failed"]
    assert "boom in the initializer" in failed[0]["reason"] and failed[0]["phase"] == "initializer"
    assert "not run" in failed[1]["reason"]
    assert log.read_text().count("loram_dst") == 1  # one launch for its group of two runs


def test_a_group_shares_one_initializer_call(tmp_path):
    rows = run_layer_loss(_small_config(initializers=["lora_sb"], seeds=[0], alignments=["random", "aligned"]),
                          tmp_path, progress=False)
    cached = {(r["alignment"], r["lr"]): r["init_cached"] for r in rows}
    # LoRA-SB's statistics depend on the target: one call per alignment, the second lr derived
    assert cached == {("random", 1e-2): False, ("random", 3e-2): True, ("aligned", 1e-2): False, ("aligned", 3e-2): True}
    assert all(r["stats_derived"] == (r["lr"] == 3e-2) for r in rows)


def test_a_slow_full_svd_is_replaced_by_the_known_one_and_others_are_skipped(tmp_path):
    measured = {"kind": "layer_loss", "status": "ok", "rank": 4, "device": "cpu", "init_method": "computed",
                "d_out": 48, "d_in": 40, "init_seconds": 1.0}
    rows = [{**measured, "initializer": "pissa"}, {**measured, "initializer": "lora_da"}]
    big = _task("pissa", 4800, 4000)
    assert predict_init_seconds(big, rows) == pytest.approx(1.0 * (4800 * 4000 * 4000) / (48 * 40 * 40))
    from bench.layer.run import _decide

    assert _decide(big, rows, 60.0)[0] == "known-svd"
    assert _decide(_task("lora_da", 4800, 4000), rows, 60.0)[0] == "skipped"
    assert _decide(_task("loram_dst", 4800, 4000), rows, 60.0)[0] == "computed"  # nothing measured: no prediction


def test_bad_layer_configurations_name_the_flag():
    with pytest.raises(ValueError, match="needs --preset or --shapes"):
        LayerConfig().tasks()
    with pytest.raises(ValueError, match="--rank 40 exceeds --top-directions"):
        _small_config(rank=40, spec=ProblemSpec()).tasks()
    with pytest.raises(ValueError, match="shape 48x40: layer 48x40 is too small"):
        _small_config(spec=ProblemSpec()).tasks()
    with pytest.raises(ValueError, match="--gradients"):
        _small_config(gradients="approximate").tasks()
    with pytest.raises(ValueError, match="--seeds lists a value twice"):
        _small_config(seeds=[1, 1]).tasks()


# -- the findings ---------------------------------------------------------------------------

def _synthetic_rows(effect_per_decade: float, alignment_gain: float) -> list[dict]:
    """Finished runs of two initializers at three shapes, three seeds, two alignments."""
    rng = np.random.default_rng(0)
    rows = []
    for (m, n) in ((64, 64), (640, 640), (6400, 6400)):
        for alignment in ("aligned", "random"):
            for seed in range(3):
                base = 0.5 + 0.05 * rng.standard_normal()
                for name in ("noise_zeros", "pissa"):
                    task = _task(name, m, n, seed=seed, alignment=alignment, lr=1e-3)
                    effect = effect_per_decade * math.log10(m * n) - (alignment_gain if alignment == "aligned" else 0)
                    loss = base + (effect if name == "pissa" else 0.0) + 0.005 * rng.standard_normal()
                    rows.append({**task.to_dict(), "kind": "layer_loss", "status": "ok", "task_key": task.key,
                                 "config_key": task.config_key, "suite_key": task.suite_key, "final_loss": loss,
                                 "auc": loss, "step0_loss": 1.0, "diverged_step": 0, "final_update_norm": 1.0,
                                 "trainable_params": 10, "init_seconds": 0.1, "stats_seconds": 0.0,
                                 "timestamp": "2026-11-24T00:00:00"})
    return rows


def test_findings_resolve_a_size_trend_and_an_alignment_effect():
    frame = layer_frame(_synthetic_rows(effect_per_decade=-0.05, alignment_gain=0.2))
    found = findings(frame, config_verdicts(frame))
    size = {f.alignment: f for f in found if f.topic == "size"}
    assert size["random"].estimate == pytest.approx(-0.05, abs=0.01) and size["random"].high < 0
    assert "relatively better than noise_zeros on larger layers" in size["random"].text
    (alignment,) = [f for f in found if f.topic == "alignment"]
    assert alignment.estimate == pytest.approx(-0.2, abs=0.02) and alignment.high < 0
    assert "gains on noise_zeros when the target lies in W's top singular subspace" in alignment.text


def test_findings_say_when_nothing_is_resolved():
    frame = layer_frame(_synthetic_rows(effect_per_decade=0.0, alignment_gain=0.0))
    for finding in findings(frame, config_verdicts(frame)):
        assert not finding.resolved() or abs(finding.estimate) < 0.02
        assert "[" in finding.text  # every finding carries its interval


def test_the_report_has_the_layer_section(tmp_path):
    from reports.html import build_report

    from bench.core.results import append_rows

    append_rows(tmp_path / "layer_loss.jsonl", [
        {**r, "schema_version": 2, "loss": [1.0, r["final_loss"]], "update_norm": [0.0, 1.0], "numel": r["d_out"] * r["d_in"]}
        for r in _synthetic_rows(-0.05, 0.2)])
    path = build_report(tmp_path, tmp_path / "report.html")
    html = path.read_text()
    assert "Layer-level loss" in html and "relatively better than noise_zeros on larger layers" in html


def test_the_spawned_worker_runs_a_batch_of_layer_tasks(tmp_path):
    """The launcher a CUDA run uses (``python -m bench.layer.worker``), exercised on the CPU."""
    import sys

    from bench.core.launchers import SpawnLauncher

    import json

    from bench.layer.worker import LayerBatch

    spool = tmp_path / "spool.jsonl"
    tasks = (_task("noise_zeros"), _task("loram_dst"))
    outcome = SpawnLauncher([sys.executable, "-m", "bench.layer.worker"], decode=dict).launch(
        LayerBatch(tasks, str(spool)), 120)
    assert outcome.status == "ok", outcome.reason
    results = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [r["task_key"] for r in results] == [t.key for t in tasks] and outcome.run == {"ok": 2, "failed": 0}
    assert all(r["status"] == "ok" and r["loss"][0] == pytest.approx(1.0, abs=1e-6) and len(r["loss"]) == 6
               for r in results)


def test_report_command_accepts_a_folder_with_only_layer_results(tmp_path):
    from bench.cli import main
    from bench.core.results import append_rows

    append_rows(tmp_path / "layer_loss.jsonl", [
        {**r, "schema_version": 2, "loss": [1.0, r["final_loss"]], "update_norm": [0.0, 1.0]}
        for r in _synthetic_rows(-0.05, 0.2)])
    assert main(["report", str(tmp_path)]) == 0
    assert "Layer-level loss" in (tmp_path / "report.html").read_text()


def test_cached_factors_are_reused_only_by_the_same_initializer_code(tmp_path, monkeypatch):
    """The cache file carries the fingerprint of the loram_ref that computed it: after a code
    change (another fingerprint) the group computes its factors again instead of reusing them."""
    import bench.layer.worker as worker

    task = _task("loram_dst", cache_dir=str(tmp_path))
    problem = LayerProblem(task.d_out, task.d_in, task.seed, task.problem_spec, torch.device("cpu"))
    target = problem.target(task.alignment)
    first = worker.cached_init(task, problem, target)[1]["init_cached"]
    again = worker.cached_init(task, problem, target)[1]["init_cached"]
    monkeypatch.setattr(worker, "loram_ref_fingerprint", lambda: "0123456789abcdef")
    changed = worker.cached_init(task, problem, target)[1]["init_cached"]
    assert (first, again, changed) == (False, True, False)
    from bench.core.environment import loram_ref_fingerprint

    assert sorted(p.name for p in tmp_path.glob("*.pt")) == sorted(
        [f"{task.group_key}-{loram_ref_fingerprint()}.pt", f"{task.group_key}-0123456789abcdef.pt"])
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
