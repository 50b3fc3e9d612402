"""The loss grid on a tiny random Llama: (initializer, lr, seed) runs, a paired design,
statistics once per seed, per-run resume, published scaling, and the report's verdict."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")

import loram_ref  # noqa: E402
from bench.core.results import read_rows  # noqa: E402
from bench.loss import run as loss_run  # noqa: E402
from bench.loss.data import make_blocks  # noqa: E402
from bench.loss.model import TARGETS, tiny_llama_source  # noqa: E402
from bench.loss.run import LossConfig, run_loss  # noqa: E402
from bench.loss.train import Curve  # noqa: E402
from bench.loss.verdict import STATS_FILE, verdicts  # noqa: E402
from loram_ref import CollectContext  # noqa: E402
from loram_ref.statistics.collect import collect_lora_sb  # noqa: E402


def _config(corpus_file, **kw):
    base = dict(initializers=["noise_zeros", "lora_sb"], seeds=[0, 1], lrs=[1e-3, 3e-3], steps=4, batch_size=2,
                seq_len=32, eval_every=2, data=corpus_file, sb_samples=2, da_samples=2, bracket=False)
    return LossConfig(**{**base, **kw})


def _summaries(rows):
    return [r for r in rows if r["kind"] == "loss_summary"]


def test_every_initializer_lr_and_seed_is_one_run_and_statistics_run_once_per_seed(tmp_path, corpus_file, monkeypatch):
    calls = []
    real = loss_run.collect_shared
    monkeypatch.setattr(loss_run, "collect_shared",
                        lambda model, by_kind, *a, **k: calls.append(",".join(sorted(by_kind))) or real(model, by_kind, *a, **k))
    rows = run_loss(_config(corpus_file), tmp_path, progress=False, source=tiny_llama_source())
    runs = sorted((r["initializer"], r["lr"], r["seed"]) for r in _summaries(rows))
    assert runs == sorted((n, lr, s) for n in ("noise_zeros", "lora_sb") for lr in (1e-3, 3e-3) for s in (0, 1))
    assert calls == ["lora_sb", "lora_sb"]  # one pass per seed, reused by both learning rates
    sb = {(r["lr"], r["seed"]): r for r in _summaries(rows) if r["initializer"] == "lora_sb"}
    assert not sb[(1e-3, 0)]["stats_derived"] and sb[(3e-3, 0)]["stats_derived"]
    assert sb[(3e-3, 0)]["stats_eta_eff"] == pytest.approx(3 * sb[(1e-3, 0)]["stats_eta_eff"], rel=1e-12)
    # a rerun with one more seed runs only that seed's runs
    calls.clear()
    more = run_loss(_config(corpus_file, seeds=[0, 1, 2]), tmp_path, progress=False, source=tiny_llama_source())
    assert len(_summaries(more)) == 12 and calls == ["lora_sb"]
    assert (tmp_path / STATS_FILE).is_file()


def test_derived_lora_sb_statistics_equal_a_collection_at_that_lr():
    source = tiny_llama_source()
    model, _ = source.load()
    blocks = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    kind = loram_ref.get_initializer("lora_sb").statistics
    at = {lr: collect_lora_sb(model, blocks, TARGETS, CollectContext(batch_size=2, lr=lr, num_train=40)) for lr in (1e-3, 3e-3)}
    derived, meta = kind.at_lr(at[1e-3][0], at[1e-3][1], 1e-3, 3e-3)
    assert meta["eta_eff"] == pytest.approx(at[3e-3][1]["eta_eff"], rel=1e-12)
    for name, stats in at[3e-3][0].items():
        torch.testing.assert_close(derived[name].update, stats.update, rtol=1e-6, atol=0)
    lora_da = loram_ref.get_initializer("lora_da").statistics
    same = {"x": object()}
    assert lora_da.at_lr(same, {}, 1e-3, 3e-3)[0] is same  # K-FAC factors do not depend on the lr


def test_a_seed_fixes_the_batch_order_and_the_eval_blocks_never_change():
    ids = list(range(32 * 200))
    a, b, other = make_blocks(ids, 32, 3), make_blocks(ids, 32, 3), make_blocks(ids, 32, 4)
    assert torch.equal(a.batch(5, 4), b.batch(5, 4))
    assert not torch.equal(a.order, other.order)
    assert torch.equal(a.eval, other.eval) and len(a.eval) == 8  # a fixed eval subset, the same for every seed
    assert len(make_blocks(ids, 32, 0, max_eval=3).eval) == 3
    with pytest.raises(ValueError, match="--eval-blocks must be >= 1"):
        make_blocks(ids, 32, 0, max_eval=0)


def test_every_initializer_of_a_seed_sees_the_same_batches(tmp_path, corpus_file, monkeypatch):
    seen: dict[tuple[str, int], list] = {}
    real = loss_run.train

    def spy(model, blocks, **kw):
        seen.setdefault(("run", len(seen)), [blocks.batch(i, kw["batch_size"]).tolist() for i in range(kw["steps"])])
        return real(model, blocks, **kw)

    monkeypatch.setattr(loss_run, "train", spy)
    run_loss(_config(corpus_file, lrs=[1e-3], seeds=[0, 1]), tmp_path, progress=False, source=tiny_llama_source())
    batches = list(seen.values())  # order: seed 0 (noise_zeros, lora_sb), seed 1 (noise_zeros, lora_sb)
    assert batches[0] == batches[1] and batches[2] == batches[3] and batches[0] != batches[2]


def test_published_scaling_uses_each_initializers_registry_setup(tmp_path, corpus_file):
    config = _config(corpus_file, initializers=["noise_zeros", "lora_da"], seeds=[0], lrs=[1e-3], scaling="published",
                     rank=4)
    assert config.lora_setup("lora_da") == (16.0, True)  # the official LoRA-DA config: rsLoRA, alpha 16
    assert config.lora_setup("noise_zeros") == (8.0, False)  # PEFT's default lora_alpha
    rows = run_loss(config, tmp_path, progress=False, source=tiny_llama_source())
    by_name = {r["initializer"]: r for r in _summaries(rows)}
    assert by_name["lora_da"]["alpha"] == 16.0 and by_name["lora_da"]["use_rslora"] is True
    assert by_name["noise_zeros"]["use_rslora"] is False and by_name["lora_da"]["scaling_mode"] == "published"
    assert loram_ref.get_initializer("lora_da").published.scaling(8) == pytest.approx(16 / math.sqrt(8))
    shared = _config(corpus_file, initializers=["lora_da"])
    assert shared.lora_setup("lora_da") == (8.0, False)
    assert shared.key("m", "d") != config.key("m", "d")


@pytest.mark.parametrize("kw, message", [
    ({"seeds": [0, 0]}, "--seeds lists a value twice"),
    ({"seeds": [-1]}, "--seeds must be integers >= 0"),
    ({"seeds": []}, "--seeds and --lrs each need at least one value"),
    ({"lrs": [0.0]}, "--lrs must be finite and > 0"),
    ({"lrs": [float("nan")]}, "--lrs must be finite and > 0"),
    ({"scaling": "paper"}, "--scaling must be one of shared, published"),
    ({"autocast": "fp8"}, "--autocast must be one of"),
    ({"eval_blocks": 0}, "--eval-blocks must be an integer >= 1"),
    ({"initializers": []}, "--initializers is empty"),
])
def test_a_bad_grid_names_the_flag(corpus_file, kw, message):
    with pytest.raises(ValueError, match=message):
        _config(corpus_file, **kw).validate()


def test_cli_rejects_a_bad_lr_before_loading_anything(tmp_path, capsys):
    from bench.cli import main

    assert main(["loss", "--lrs", "1e-3", "-2", "--out", str(tmp_path)]) == 2
    assert "--lrs must be finite and > 0" in capsys.readouterr().err
    assert not (tmp_path / "loss.jsonl").exists()


def test_eval_auc_is_the_time_averaged_eval_loss():
    curve = Curve(eval_loss=[math.nan, 2.0, math.nan, 1.0], eval_loss_step0=4.0)
    # trapezoids: steps 0-2: (4+2)/2*2 = 6, steps 2-4: (2+1)/2*2 = 3; over 4 steps
    assert curve.eval_auc() == pytest.approx(9 / 4)
    assert math.isnan(Curve(eval_loss=[math.nan], eval_loss_step0=4.0).eval_auc())


def test_training_commands_spin_briefly_and_init_workers_still_sleep():
    from bench.core.launchers import WORKER_ENV

    code = ("import os, bench.cli as c; c.main(['loss', '--lrs', '0']); "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('KMP_BLOCKTIME'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["3000", "1"]
    user = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "OMP_WAIT_POLICY": "PASSIVE"})
    assert user.stdout.split() == ["None", "None"]  # the user's own policy wins
    assert WORKER_ENV["OMP_WAIT_POLICY"] == "PASSIVE" and WORKER_ENV["GOMP_SPINCOUNT"] == "0"


def test_the_report_shows_the_verdict_bands_and_the_magnitude_scatter(tmp_path, corpus_file):
    from reports.html import build_report
    from reports.tables import load_results

    run_loss(_config(corpus_file, seeds=[0, 1, 2], lrs=[1e-3]), tmp_path, progress=False, source=tiny_llama_source())
    data = load_results(tmp_path)
    assert data.loss_verdict is not None and set(data.loss_verdict.sentences) == {"noise_zeros", "lora_sb"}
    assert len(data.loss_summary) == 6
    page = build_report(tmp_path, tmp_path / "report.html").read_text()
    assert "Verdict" in page and "Update magnitude against eval loss" in page and "toself" in page
    assert "vs noise_zeros at its best lr" in page
    (table,) = [v.table for v in verdicts(read_rows(tmp_path / "loss.jsonl"))]
    assert set(table["seeds"]) == {3}


# -- the design: schedule, selection apart, brackets, the eval set's sampling error -------------

def test_the_schedule_warms_up_then_decays_to_zero():
    from bench.loss.train import lr_factor

    assert [lr_factor(s, 10, 2, "linear") for s in (1, 2, 3, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.125])
    assert lr_factor(3, 10, 2, "cosine") == pytest.approx(1.0) and lr_factor(10, 10, 2, "cosine") < 0.05
    assert lr_factor(7, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="--schedule"):
        lr_factor(1, 10, 0, "step")
    assert LossConfig(steps=40).warmup_steps == 2  # ceil(3 % of 40)


def test_per_block_eval_losses_average_to_the_models_own_loss():
    from bench.loss.train import eval_block_losses

    model, _ = tiny_llama_source().load(torch.float32, "cpu")
    blocks = torch.randint(0, 100, (6, 16), generator=torch.Generator().manual_seed(0))
    per_block = eval_block_losses(model, blocks, batch_size=4)
    with torch.no_grad():
        expected = float(model(input_ids=blocks, labels=blocks).loss)
    assert len(per_block) == 6 and sum(per_block) / 6 == pytest.approx(expected, rel=1e-5)


def test_the_model_level_grid_selects_apart_brackets_and_records_what_fine_tuning_changed(tmp_path, corpus_file):
    config = _config(corpus_file, seeds=[0, 1], selection_seeds=[9], lrs=[1e-4, 3e-4], bracket=True,
                     initializers=["noise_zeros", "loram_dst"], eval_blocks=4, steps=3)
    rows = run_loss(config, tmp_path, progress=False, source=tiny_llama_source())
    summaries = _summaries(rows)
    selection = [r for r in summaries if r["stage"] == "selection"]
    evaluation = [r for r in summaries if r["stage"] == "evaluation"]
    assert {r["seed"] for r in selection} == {9} and {r["seed"] for r in evaluation} == {0, 1}
    assert len({r["lr"] for r in selection}) > 2  # an edge optimum was extended
    chosen = {r["initializer"]: r["lr"] for r in evaluation}
    assert all(r["lr"] == chosen[r["initializer"]] for r in evaluation)
    one = evaluation[0]
    assert len(one["final_eval_blocks"]) == one["eval_blocks"] and one["warmup_steps"] == 1
    assert {k for k in one if k.startswith("delta_rel_norm_")} == {f"delta_rel_norm_{t}" for t in TARGETS}
    assert all(0 < one[f"delta_rel_norm_{t}"] < 1 and 1 <= one[f"delta_stable_rank_{t}"] <= 2 * config.rank
               for t in TARGETS)
    (verdict,) = verdicts(rows)
    best = verdict.best.set_index("initializer")
    assert best.loc["loram_dst", "interval_method"].startswith("t with the crossed bootstrap SE over 2 seeds")
    assert "lr chosen on 1 other seeds" in verdict.sentences["loram_dst"]


def test_the_crossed_bootstrap_holds_the_eval_blocks_sampling_error():
    """Differences with a large per-block component: the seeds-only interval misses it, the
    crossed bootstrap's SE carries it (within Monte Carlo error of the analytic SE)."""
    import numpy as np

    from bench.loss.verdict import crossed_bootstrap_se

    rng = np.random.default_rng(3)
    seeds, blocks = 8, 32
    block_effect = rng.normal(0, 0.2, size=(1, blocks))
    d = 0.01 + rng.normal(0, 0.01, size=(seeds, 1)) + block_effect + rng.normal(0, 0.01, size=(seeds, blocks))
    seeds_only = d.mean(1).std(ddof=1) / math.sqrt(seeds)
    analytic = math.sqrt(0.01**2 / seeds + 0.2**2 / blocks + 0.01**2 / (seeds * blocks))
    se = crossed_bootstrap_se(d)
    assert se > 5 * seeds_only and se == pytest.approx(analytic, rel=0.3)


def test_one_statistics_pass_per_seed_serves_every_data_aware_initializer(tmp_path, corpus_file, monkeypatch):
    """lora_sb, lora_ga and eva read three kinds; each seed runs one pass for all three, and
    MiCA's B stays frozen while its A trains."""
    calls = []
    real = loss_run.collect_shared
    monkeypatch.setattr(loss_run, "collect_shared",
                        lambda model, by_kind, *a, **k: calls.append(sorted(by_kind)) or real(model, by_kind, *a, **k))
    config = _config(corpus_file, initializers=["lora_sb", "lora_ga", "eva", "mica"], lrs=[1e-3], seeds=[0, 1])
    rows = run_loss(config, tmp_path, progress=False, source=tiny_llama_source())
    assert calls == [["gradient", "input_moments", "lora_sb"]] * 2
    summaries = {(r["initializer"], r["seed"]): r for r in _summaries(rows)}
    assert len(summaries) == 8 and all(not r["diverged_step"] for r in summaries.values())
    for seed in (0, 1):
        shared = {summaries[(name, seed)]["stats_seconds"] for name in ("lora_sb", "lora_ga", "eva")}
        assert len(shared) == 1 and summaries[("lora_ga", seed)]["stats_pass_kinds"] == 3
    # MiCA trains A alone: r·d_in of LoRA-GA's r·(d_in + d_out) per layer
    assert 0 < summaries[("mica", 0)]["trainable_params"] < summaries[("lora_ga", 0)]["trainable_params"]
