"""The loss benchmarks' design: capacity floors, bracketed learning rates, selection apart
from evaluation, minimum detectable effects, equivalence, and magnitude by intervention."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import loram_ref
from bench.core.brackets import ALL_DIVERGED, BRACKETED, EDGE_HIGH, EDGE_LOW, MAX_EXTENSIONS, choose_lr
from bench.core.paired import verdict_for
from bench.core.power import mde, t_test_power, tost_p
from bench.layer.factored import AdapterState, train_layer
from bench.layer.floors import capacity_floor, progress_fraction, rank_floor
from bench.layer.problem import LayerProblem
from bench.layer.run import LayerConfig, matched_noise_lr, run_layer_loss
from bench.layer.spec import ProblemSpec
from bench.layer.task import LayerTask
from bench.layer.worker import compute_init
from loram_ref import Invariant

SMALL = ProblemSpec(top_directions=8, target_rank=4, target_scale=0.05)
#: what the layer task runs: every initializer but those whose registry entry says why not
NAMES = sorted(n for n, s in loram_ref.INITIALIZERS.items() if s.layer_task_excluded is None)


def _init(name: str, problem: LayerProblem, alignment: str = "random", rank: int = 4):
    task = LayerTask(initializer=name, d_out=problem.m, d_in=problem.n, seed=problem.seed, lr=1e-2, alignment=alignment,
                     rank=rank, spec=problem.spec.__dict__, steps=5, threads=1)
    target = problem.target(alignment)
    init, _ = compute_init(task, problem, target)
    spec = loram_ref.get_initializer(name)
    state = AdapterState(init.A, init.B, init.scaling, spec.invariant != Invariant.SHIFTED, init.R,
                         train_b="B" in spec.trains)
    return state, target


def _floor(state: AdapterState, target, problem: LayerProblem, rank: int) -> float:
    return capacity_floor(state.a0, state.p0, state.scaling, target, problem.input_var, rank,
                          preserves_function=state.preserves_function, only_middle=state.middle is not None,
                          only_a=state.only_a, b=state.b if state.middle is not None or state.only_a else None)


# -- capacity floors ----------------------------------------------------------------------------

def test_loram_floor_at_a_7b_shape_is_known_before_training():
    """At 4096², a random target of rank 16 > r = 8 and scale 0.05, LoRAM's rank-8 update must
    cancel its own s·B₀·A₀ (‖·‖ = √Q·‖W‖ = 0.5·‖W‖) before it can fit the target: the floor
    is ≈ 0.997, noise-zeros' the target's own tail, 0.036."""
    problem = LayerProblem(4096, 4096, 0, ProblemSpec(target_scale=0.05))
    state, target = _init("loram_dst", problem, rank=8)
    floor = _floor(state, target, problem, 8)
    assert 0.99 < floor < 1.0
    assert rank_floor(target, problem.input_var, 8) == pytest.approx(0.0359, abs=2e-3)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("alignment", ["aligned", "random"])
@pytest.mark.parametrize("spec", [SMALL, replace(SMALL, input_spectrum="decaying", target_rank=8)],
                         ids=["isotropic-k4", "decaying-k8"])
def test_the_factored_floor_equals_a_dense_svd(name, alignment, spec):
    problem = LayerProblem(40, 48, 1, spec)
    state, target = _init(name, problem, alignment)
    sqrt_var = problem.input_var.double().sqrt()[None, :]
    dense_target = target.dense().double()
    c = dense_target + (state.scaling * state.p0.double() @ state.a0.double() if state.preserves_function else 0.0)
    c_sigma = c * sqrt_var
    norm = float((dense_target * sqrt_var).square().sum())
    if state.middle is not None:  # only R trains: what the projection onto col(B) ⊗ row(A·Σ^½) leaves
        q_b, _ = torch.linalg.qr(state.b.double())
        q_a, _ = torch.linalg.qr((state.a0.double() * sqrt_var).mT)
        left = c_sigma - q_b @ (q_b.mT @ c_sigma @ q_a) @ q_a.mT
        expected = float(left.square().sum()) / norm
    elif state.only_a:  # only A trains (MiCA): what the projection onto col(B₀) leaves
        q_b, _ = torch.linalg.qr(state.b.double())
        expected = float((c_sigma - q_b @ (q_b.mT @ c_sigma)).square().sum()) / norm
    else:
        energy = torch.linalg.svdvals(c_sigma).square()
        expected = float(energy[4:].sum()) / norm
    assert _floor(state, target, problem, 4) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_no_run_ends_below_its_floor_and_progress_is_a_fraction(tmp_path):
    config = LayerConfig(shapes=[(48, 40)], initializers=NAMES, alignments=["aligned", "random", "bottom"], seeds=[0],
                         lrs=[3e-3, 3e-2], steps=60, rank=4, spec=SMALL, threads=1, bracket=False)
    rows = run_layer_loss(config, tmp_path, progress=False)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(NAMES) * 3 * 2
    for row in ok:
        assert row["final_loss"] >= row["capacity_floor"] - 1e-6, (row["initializer"], row["alignment"], row["lr"])
        if row["progress_fraction"] is not None:
            assert row["progress_fraction"] <= 1 + 1e-6
    assert progress_fraction(0.5, 0.999999999999) is None and progress_fraction(0.5, 0.0) == pytest.approx(0.5)


def test_a_step_evaluates_the_loss_once():
    """On exact gradients the loss a step trains on is the previous step's result: T steps
    cost T + 1 evaluations of the loss, not 2T + 1."""
    import bench.layer.factored as factored

    problem = LayerProblem(48, 40, 0, SMALL)
    state, target = _init("noise_zeros", problem)
    calls = []
    original = factored.exact_loss

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    factored.exact_loss = counting
    try:
        curve = train_layer(state, target, problem.input_var, steps=7, lr=1e-2)
    finally:
        factored.exact_loss = original
    assert len(calls) == 8 and len(curve.loss) == 8 and len(curve.update_norm) == 8


# -- bracketed learning rates ---------------------------------------------------------------------

GRID = [1e-3, 3e-3, 1e-2]


def test_an_interior_optimum_is_bracketed():
    choice = choose_lr({1e-3: 0.5, 3e-3: 0.3, 1e-2: 0.4}, GRID)
    assert (choice.lr, choice.status, choice.next_lr) == (3e-3, BRACKETED, None)
    diverged_above = choose_lr({1e-3: 0.5, 3e-3: 0.3, 1e-2: math.nan}, GRID)
    assert diverged_above.bracketed


def test_an_edge_optimum_asks_for_the_next_lr_until_the_extensions_are_spent():
    high = choose_lr({1e-3: 0.5, 3e-3: 0.4, 1e-2: 0.3}, GRID)
    assert high.status == EDGE_HIGH and high.next_lr == pytest.approx(3.16e-2)
    low = choose_lr({1e-3: 0.2, 3e-3: 0.4, 1e-2: 0.5}, GRID)
    assert low.status == EDGE_LOW and low.next_lr == pytest.approx(3.16e-4)
    means = {1e-3: 0.5, 3e-3: 0.4, 1e-2: 0.3}
    lr = 1e-2
    for _ in range(MAX_EXTENSIONS):
        lr = float(f"{lr * math.sqrt(10):.3g}")
        means[lr] = means[max(means)] - 0.05
    final = choose_lr(means, GRID)
    assert final.status == EDGE_HIGH and final.next_lr is None and final.lr == max(means)
    assert choose_lr({1e-3: math.nan}, [1e-3]).next_lr == pytest.approx(3.16e-4)
    assert choose_lr({1e-3: math.nan}, [1e-3], max_extensions=0).status == ALL_DIVERGED


def test_the_driver_extends_the_grid_until_the_optimum_is_bracketed(tmp_path):
    config = LayerConfig(shapes=[(48, 40)], initializers=["noise_zeros"], alignments=["random"], seeds=[0, 1],
                         selection_seeds=[7], lrs=[3e-3, 1e-2], steps=30, rank=4, spec=SMALL, threads=1)
    rows = run_layer_loss(config, tmp_path, progress=False)
    selection = sorted({r["lr"] for r in rows if r["stage"] == "selection"})
    assert len(selection) > 2 and selection[0] == 3e-3  # extended upwards only
    from bench.layer.verdict import layer_verdict

    verdict = layer_verdict(rows)
    (chosen,) = verdict.configs[0].verdict.best.itertuples()
    assert chosen.lr_status == BRACKETED and chosen.lr < max(selection)
    evaluation = {(r["seed"], r["lr"]) for r in rows if r["stage"] == "evaluation"}
    assert evaluation == {(0, chosen.lr), (1, chosen.lr)}  # scored on the other seeds, at the chosen lr
    again = run_layer_loss(config, tmp_path, progress=False)
    assert len(again) == len(rows)  # resumed: every decision recomputed from the rows, nothing run twice


# -- selection apart from evaluation --------------------------------------------------------------

def _summary(values: dict[tuple[str, float, int, str], float]) -> pd.DataFrame:
    return pd.DataFrame([{"config_key": "k", "initializer": name, "lr": lr, "seed": seed, "stage": stage,
                          "final_eval_loss": v, "eval_auc": v, "diverged_step": 0, "final_update_norm": 1.0,
                          "trainable_params": 10, "step0_eval_loss_change": 0.0, "init_seconds": 0.0,
                          "stats_seconds": 0.0, "lr_grid": "[0.001, 0.003, 0.01]"}
                         for (name, lr, seed, stage), v in values.items()])


def test_the_lr_is_chosen_on_selection_seeds_and_scored_on_evaluation_seeds():
    values = {}
    for lr, sel in ((1e-3, 0.5), (3e-3, 0.3), (1e-2, 0.4)):
        for seed in (100, 101):
            values[("noise_zeros", lr, seed, "selection")] = sel
            values[("loram_dst", lr, seed, "selection")] = sel + 0.1
    for seed in range(6):  # scored: loram_dst better at its chosen lr
        values[("noise_zeros", 3e-3, seed, "evaluation")] = 0.30 + 0.01 * seed
        values[("loram_dst", 3e-3, seed, "evaluation")] = 0.20 + 0.01 * seed + 0.001 * (seed % 2)
    verdict = verdict_for(_summary(values))
    best = verdict.best.set_index("initializer")
    assert best.loc["loram_dst", "lr"] == 3e-3 and best.loc["loram_dst", "seeds"] == 6
    assert best.loc["loram_dst", "final_eval_mean"] == pytest.approx(np.mean([0.20 + 0.01 * s + 0.001 * (s % 2)
                                                                             for s in range(6)]))
    assert not best.loc["loram_dst", "selected_on_scored_seeds"]
    assert "lr chosen on 2 other seeds" in verdict.sentences["loram_dst"]
    assert "better than noise_zeros" in verdict.sentences["loram_dst"]


def test_an_unbracketed_choice_is_called_provisional():
    values = {}
    for lr, v in ((1e-3, 0.5), (3e-3, 0.4), (1e-2, 0.3)):
        for seed in range(4):
            values[("noise_zeros", lr, seed, "selection+evaluation")] = v + 0.01 * seed
            values[("loram_dst", lr, seed, "selection+evaluation")] = v + 0.01 * seed + 0.001 * (seed % 3)
    verdict = verdict_for(_summary(values))
    assert "Provisional" in verdict.sentences["loram_dst"] and EDGE_HIGH in verdict.sentences["loram_dst"]
    assert "lr chosen on the same seeds" in verdict.sentences["loram_dst"]


# -- power and equivalence -------------------------------------------------------------------------

@pytest.mark.parametrize("seeds, tests", [(3, 7), (5, 3), (20, 7), (20, 1)])
def test_an_effect_equal_to_the_printed_mde_is_detected_in_80_percent_of_replications(seeds, tests):
    """The MDE the verdict prints (from the observed sd of the paired differences) is the
    effect its test detects with 80 % power: 1000 simulated replications with that true
    effect and that sd, each tested as the verdict tests (paired t at the Bonferroni level,
    which Holm's first step is). The bound allows the binomial error of 1000 replications
    (sd 1.3 points); the exact power is checked to 1e-6 by integration."""
    rng = np.random.default_rng(seeds * 100 + tests)
    sd = 0.05
    printed = mde(sd, seeds, tests=tests)
    crit = stats.t.ppf(1 - 0.05 / tests / 2, seeds - 1)
    assert t_test_power(printed * math.sqrt(seeds) / sd, crit, seeds - 1) == pytest.approx(0.8, abs=1e-6)
    d = rng.normal(printed, sd, size=(1000, seeds))
    detected = stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05 / tests
    assert detected.mean() >= 0.8 - 2.5 * math.sqrt(0.8 * 0.2 / 1000)


def test_the_verdict_prints_the_mde_and_its_multiple_of_the_half_width():
    """With 3 seeds and 7 tests the detectable effect is ~3.5x the printed half-width."""
    values = {}
    rng = np.random.default_rng(1)
    names = ["noise_zeros"] + [f"x{i}" for i in range(7)]
    for seed in range(3):
        shift = rng.normal(0, 0.1)
        for name in names:
            values[(name, 1e-3, seed, "selection+evaluation")] = 0.5 + shift + rng.normal(0, 0.02)
    frame = _summary(values)
    frame["lr_grid"] = "[0.001]"
    verdict = verdict_for(frame)
    row = verdict.best.set_index("initializer").loc["x0"]
    half = (row["best_diff_ci_high"] - row["best_diff_ci_low"]) / 2
    assert row["best_mde"] / half == pytest.approx(3.49, abs=0.02)
    if "not distinguishable" in verdict.sentences["x0"]:
        assert f"±{row['best_mde']:.3f} at 80 % power" in verdict.sentences["x0"]


def test_as_good_as_needs_the_equivalence_test():
    values = {}
    for seed in range(12):
        values[("noise_zeros", 1e-3, seed, "selection+evaluation")] = 0.30 + 0.02 * (seed % 4)
        values[("loram_dst", 1e-3, seed, "selection+evaluation")] = 0.30 + 0.02 * (seed % 4) + 0.001 * ((seed % 3) - 1)
    frame = _summary(values)
    frame["lr_grid"] = "[0.001]"
    assert "as good as noise_zeros within ±0.02" in verdict_for(frame, margin=0.02).sentences["loram_dst"]
    assert "as good as" not in verdict_for(frame).sentences["loram_dst"]  # no margin declared: no such claim
    assert tost_p(0.0, 1.0, 10, 0.01) > 0.4 and tost_p(0.0, 0.001, 10, 0.01) < 1e-6


# -- magnitude by intervention ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(96, 80), (200, 64), (64, 200)], ids=["square", "tall", "wide"])
@pytest.mark.parametrize("name", ["loram_dst", "loram_rorth"])
@pytest.mark.parametrize("gain", [0.5, 1.0, 2.0])
def test_the_matched_lr_gives_noise_zeros_loram_s_first_step_norm(shape, name, gain):
    m, n = shape
    problem = LayerProblem(m, n, 0, SMALL)
    target = problem.target("random")
    w = problem.weight()
    lr = 1e-3
    spec = loram_ref.get_initializer(name)
    kwargs = {"generator": torch.Generator().manual_seed(0)} if "generator" in spec.harness else {}
    loram = spec.fn(w, 4, 1.0, gain_multiplier=gain, **kwargs)
    noise = loram_ref.get_initializer("noise_zeros").fn(w, 4, 1.0, generator=torch.Generator().manual_seed(1))
    first = []
    for init, step_lr in ((loram, lr), (noise, matched_noise_lr(lr, loram.info["beta"], m, n))):
        state = AdapterState(init.A, init.B, 1.0, True)
        curve = train_layer(state, target, problem.input_var, steps=1, lr=step_lr)
        first.append(curve.update_norm[1])
    assert first[1] / first[0] == pytest.approx(1.0, abs=0.1)


def test_the_gain_multiplier_scales_loram_s_factors_and_keeps_the_function():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    base = loram_ref.get_initializer("loram_dst").fn(w, 4, 1.0)
    half = loram_ref.get_initializer("loram_dst").fn(w, 4, 1.0, gain_multiplier=0.5)
    assert torch.allclose(half.A, 0.5 * base.A) and torch.allclose(half.B, 0.5 * base.B)
    assert torch.allclose(half.residual + half.B @ half.A, w, atol=1e-5)
    assert half.info["beta"] == pytest.approx(0.5 * base.info["beta"]) and half.info["gain_multiplier"] == 0.5
    with pytest.raises(ValueError, match="gain_multiplier must be finite and > 0"):
        loram_ref.get_initializer("loram_dst").fn(w, 4, 1.0, gain_multiplier=0.0)


def test_the_magnitude_stage_runs_gain_arms_and_matched_noise_zeros(tmp_path):
    config = LayerConfig(shapes=[(48, 40)], initializers=["noise_zeros", "loram_dst"], alignments=["random"],
                         seeds=[0, 1, 2], lrs=[1e-2], steps=10, rank=4, spec=SMALL, threads=1, bracket=False,
                         loram_gains=[0.5, 1.0])
    rows = run_layer_loss(config, tmp_path, progress=False)
    arms = {r["arm"] for r in rows if r["stage"] == "magnitude"}
    assert arms == {"gain 0.5", "matched to loram_dst gain 0.5", "matched to loram_dst gain 1"}
    from bench.layer.verdict import layer_verdict

    table = layer_verdict(rows).magnitude
    assert set(table["gain"]) == {0.5, 1.0} and (table["seeds"] == 3).all()
    assert ((table["first_step_ratio"] - 1).abs() < 0.15).all()
    assert (tmp_path / "layer_loss_magnitude.csv").is_file()


def test_bad_design_parameters_name_the_flag():
    base = dict(shapes=[(48, 40)], initializers=["noise_zeros", "loram_dst"], seeds=[0, 1], lrs=[1e-2], rank=4,
                spec=SMALL, threads=1)
    with pytest.raises(ValueError, match="--selection-seeds and --seeds share"):
        LayerConfig(**base, selection_seeds=[1, 5]).tasks()
    with pytest.raises(ValueError, match="--target-scales must be finite and > 0"):
        LayerConfig(**base, target_scales=[0.0]).tasks()
    with pytest.raises(ValueError, match="--loram-gains needs a LoRAM initializer"):
        LayerConfig(**{**base, "initializers": ["noise_zeros"]}, loram_gains=[0.5]).tasks()
    with pytest.raises(ValueError, match="--equivalence-margin"):
        LayerConfig(**base, equivalence_margin=-1.0).tasks()


def test_the_report_draws_the_plane_the_floors_and_the_magnitude_table(tmp_path):
    from reports.html import build_report

    config = LayerConfig(shapes=[(48, 40)], initializers=["noise_zeros", "loram_dst"], alignments=["random"],
                         seeds=[0, 1, 2], lrs=[1e-2], steps=8, rank=4, spec=SMALL, threads=1, bracket=False,
                         target_ranks=[2, 4], target_scales=[0.05, 0.5], loram_gains=[0.5, 1.0])
    run_layer_loss(config, tmp_path, progress=False)
    page = build_report(tmp_path, tmp_path / "report.html").read_text()
    for title in ("Where each initializer wins and loses against noise_zeros", "Capacity floor against final error",
                  "Magnitude by intervention", "capacity_floor_mean", "lr_status"):
        assert title in page, title
