"""The loss verdict's statistics on rows made here: intervals, paired tests, Holm, tied
ranks, best learning rates, diverged runs and the sentences a reader acts on."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.loss.verdict import Interval, Paired, holm, tied_places, verdict_for, verdicts, write_verdict


def _rows(effects, lrs=(1e-3, 3e-3), seeds=(0, 1, 2, 3), seed_noise=0.05, noise=0.003, lr_penalty=None, rng_seed=0):
    """Synthetic summaries: loss = 2.7 + a shared per-seed shift + the initializer's effect + small noise."""
    rng = random.Random(rng_seed)
    lr_penalty = lr_penalty or {}
    rows = []
    for seed in seeds:
        shift = rng.gauss(0, seed_noise)
        for name, effect in effects.items():
            for lr in lrs:
                loss = 2.7 + shift + effect + lr_penalty.get((name, lr), 0.0) + rng.gauss(0, noise)
                rows.append({"kind": "loss_summary", "config_key": "k", "initializer": name, "lr": lr, "seed": seed,
                             "final_eval_loss": loss, "eval_auc": loss + 0.2, "diverged_step": 0,
                             "final_update_norm": 10.0 - loss, "trainable_params": 100, "step0_eval_loss_change": 0.0,
                             "init_seconds": 0.01, "stats_seconds": 0.0, "timestamp": "2026-11-23T00:00:00"})
    return rows


def test_interval_is_the_student_t_interval():
    x = [2.0, 2.5, 2.25, 2.4]
    iv = Interval.of(x)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert (iv.low, iv.high, iv.n) == (pytest.approx(low), pytest.approx(high), 4)
    one = Interval.of([2.0])
    assert one.mean == 2.0 and math.isnan(one.low) and math.isnan(one.half_width)


def test_paired_difference_uses_common_seeds_and_the_paired_t_test():
    a = {0: 2.0, 1: 2.3, 2: 2.1, 5: 9.0}
    ref = {0: 2.1, 1: 2.35, 2: 2.25, 3: 1.0}
    paired = Paired.of(a, ref)
    assert paired.seeds == (0, 1, 2)
    assert paired.p == pytest.approx(stats.ttest_rel([2.0, 2.3, 2.1], [2.1, 2.35, 2.25]).pvalue)
    assert paired.diff.mean == pytest.approx(-0.1)


def test_holm_adjusts_step_down_and_keeps_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.5, math.nan, 0.001])
    assert adjusted[0] == pytest.approx(0.5) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.002)


def test_ranks_tie_where_no_paired_interval_separates():
    shift = {s: random.Random(s).gauss(0, 0.1) for s in range(4)}
    finals = {
        "best": {s: 2.0 + shift[s] + 0.001 * s for s in range(4)},
        "mid_a": {s: 2.2 + shift[s] + 0.01 * (-1) ** s for s in range(4)},
        "mid_b": {s: 2.2 + shift[s] - 0.01 * (-1) ** s for s in range(4)},
    }
    assert tied_places(finals) == {"best": "1", "mid_a": "=2", "mid_b": "=2"}
    one_seed = {name: {0: v[0]} for name, v in finals.items()}
    assert set(tied_places(one_seed).values()) == {"=1"}  # one seed resolves nothing


def test_verdict_finds_a_real_difference_and_ties_noise():
    rows = _rows({"noise_zeros": 0.0, "loram_dst": -0.08, "pissa_rsvd": 0.0})
    verdict = verdict_for(pd.DataFrame(rows))
    best = verdict.best.set_index("initializer")
    assert best.loc["loram_dst", "place"] == "1"
    assert best.loc["loram_dst", "best_diff_ci_high"] < 0 and best.loc["loram_dst", "best_p_holm"] < 0.01
    assert best.loc["pissa_rsvd", "best_p_holm"] > 0.05
    assert best.loc["noise_zeros", "place"] == best.loc["pissa_rsvd", "place"] == "=2"
    assert "better than noise_zeros" in verdict.sentences["loram_dst"]
    assert "not distinguishable from noise_zeros" in verdict.sentences["pissa_rsvd"]
    assert "the reference" in verdict.sentences["noise_zeros"]
    # the shared seed shift is large: unpaired intervals would overlap, the paired one does not
    row = best.loc["loram_dst"]
    assert row["final_eval_ci_high"] > best.loc["noise_zeros", "final_eval_ci_low"]


def test_best_lr_is_each_initializers_own_and_skips_lrs_where_a_seed_diverged():
    rows = _rows({"noise_zeros": 0.0, "loram_dst": 0.0}, lrs=(3e-4, 1e-3, 3e-3),
                 lr_penalty={("noise_zeros", 3e-4): 0.2, ("noise_zeros", 3e-3): 0.1,
                             ("loram_dst", 3e-4): 0.3, ("loram_dst", 1e-3): 0.1, ("loram_dst", 3e-3): -0.05})
    for r in rows:  # loram_dst at 3e-3 diverges on one seed: that lr cannot be its best
        if r["initializer"] == "loram_dst" and r["lr"] == 3e-3 and r["seed"] == 2:
            r.update(diverged_step=3, final_eval_loss=math.nan, eval_auc=math.nan, final_update_norm=math.nan)
    verdict = verdict_for(pd.DataFrame(rows))
    best = verdict.best.set_index("initializer")
    assert best.loc["noise_zeros", "lr"] == 1e-3 and best.loc["loram_dst", "lr"] == 1e-3
    grid = verdict.table.set_index(["initializer", "lr"])
    assert grid.loc[("loram_dst", 3e-3), "diverged"] == 1 and grid.loc[("loram_dst", 3e-3), "seeds"] == 4
    assert np.isfinite(grid.loc[("loram_dst", 3e-3), "final_eval_mean"])  # over the 3 seeds that finished


def test_one_seed_gives_numbers_but_no_verdict():
    rows = _rows({"noise_zeros": 0.0, "lora_sb": 0.05}, lrs=(1e-3,), seeds=(0,))
    verdict = verdict_for(pd.DataFrame(rows))
    assert "no interval, no verdict" in verdict.sentences["lora_sb"]
    assert set(verdict.best["place"]) == {"=1"}


def test_without_the_reference_there_is_no_paired_comparison():
    verdict = verdict_for(pd.DataFrame(_rows({"loram_dst": 0.0, "pissa": 0.01})))
    assert verdict.reference == "" and "no paired comparison (no reference runs)" in verdict.sentences["pissa"]


def test_magnitude_relation_reports_spearman_overall_and_per_lr():
    verdict = verdict_for(pd.DataFrame(_rows({"noise_zeros": 0.0, "loram_dst": -0.05})))
    overall = verdict.magnitude.set_index("lr").loc["all"]
    assert overall["runs"] == 16 and overall["spearman_rho"] == pytest.approx(-1.0)  # norm = 10 - loss by construction
    assert set(verdict.magnitude["lr"]) == {"all", "1e-3", "3e-3", "within noise_zeros", "within loram_dst"}


def test_loss_stats_csv_has_every_configuration_and_the_columns_the_issue_names(tmp_path):
    rows = _rows({"noise_zeros": 0.0, "loram_dst": -0.05}) + [
        {**r, "config_key": "old", "timestamp": "2026-01-01T00:00:00"} for r in _rows({"noise_zeros": 0.0}, seeds=(0, 1))]
    path = write_verdict(rows, tmp_path)
    table = pd.read_csv(path)
    assert set(table["config_key"]) == {"k", "old"}
    for column in ("seeds", "final_eval_mean", "final_eval_ci_low", "final_eval_ci_high", "eval_auc_mean", "diff_mean",
                   "diff_ci_low", "diff_ci_high", "p_value", "is_best_lr", "place", "trainable_params",
                   "step0_eval_loss_change", "init_seconds", "stats_seconds"):
        assert column in table.columns
    assert verdicts(rows)[0].config_key == "k"  # the most recent configuration first
    assert write_verdict([], tmp_path / "none") is None


def test_rows_of_several_configurations_are_refused_by_verdict_for():
    rows = _rows({"noise_zeros": 0.0}) + [{**r, "config_key": "other"} for r in _rows({"noise_zeros": 0.0})]
    with pytest.raises(ValueError, match="one configuration"):
        verdict_for(pd.DataFrame(rows))


def test_learning_rates_print_without_losing_digits():
    from bench.loss.verdict import lr_text

    assert [lr_text(v) for v in (3e-4, 1e-3, 1.5e-3, 2.5e-4)] == ["3e-4", "1e-3", "1.5e-3", "2.5e-4"]
