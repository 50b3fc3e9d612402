"""The loss benchmark on a tiny random Llama: determinism, step-0 identity, save/reload."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import loram_ref  # noqa: E402
from bench.loss.apply import apply_initializer, merge_lora_sb, product_diff_norm_sq  # noqa: E402
from bench.loss.stats_pass import collect_lora_da, collect_lora_sb  # noqa: E402
from bench.loss.data import file_corpus, make_blocks  # noqa: E402
from bench.loss.model import TARGETS, tiny_llama_source  # noqa: E402
from bench.loss.run import LossConfig, run_loss  # noqa: E402
from bench.core.rows import LOSS  # noqa: E402

from .conftest import TEXT  # noqa: E402


def _config(corpus_file, **kw):
    base = dict(initializers=["noise_zeros", "loram_dst"], steps=4, batch_size=2, seq_len=32, eval_every=2,
                data=corpus_file, sb_samples=2, da_samples=2, bracket=False)
    return LossConfig(**{**base, **kw})


def test_same_seed_gives_identical_curves(tmp_path, corpus_file):
    config = _config(corpus_file, initializers=["pissa_rsvd", "lora_sb"])
    first = run_loss(config, tmp_path / "a", progress=False, source=tiny_llama_source())
    second = run_loss(config, tmp_path / "b", progress=False, source=tiny_llama_source())
    a = [(r["initializer"], r["step"], r["train_loss"], r["update_norm"]) for r in first if r["kind"] == "loss"]
    b = [(r["initializer"], r["step"], r["train_loss"], r["update_norm"]) for r in second if r["kind"] == "loss"]
    assert a == b and len(a) == 8
    assert all(math.isfinite(x[2]) for x in a)


def test_rows_have_steps_eval_and_summary(tmp_path, corpus_file):
    rows = run_loss(_config(corpus_file), tmp_path, progress=False, source=tiny_llama_source())
    steps = [r for r in rows if r["kind"] == "loss" and r["initializer"] == "loram_dst"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert math.isnan(steps[0]["eval_loss"]) and not math.isnan(steps[1]["eval_loss"])  # every k = 2 steps
    assert steps[0]["update_norm"] > 0 and steps[-1]["update_norm"] > steps[0]["update_norm"]
    summary = {r["initializer"]: r for r in rows if r["kind"] == "loss_summary"}
    assert summary["noise_zeros"]["step0_shift_norm"] == 0.0
    assert summary["loram_dst"]["step0_delta_rel_norm"] > 0.1  # s·√Q with s = 16/8
    assert summary["loram_dst"]["data_sha256"] and (tmp_path / "loss.csv").is_file()
    assert {r["schema_version"] for r in rows} == {LOSS.version}
    # a rerun with the same configuration skips what is done
    again = run_loss(_config(corpus_file), tmp_path, progress=False, source=tiny_llama_source())
    assert len(again) == len(rows)


@pytest.mark.parametrize("name", ["pissa", "pissa_rsvd", "loram_dst", "loram_rorth", "noise_zeros", "gaussian"])
def test_step0_output_equals_base_model(name):
    source = tiny_llama_source()
    base, _ = source.load()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model, _ = source.load()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    apply_initializer(model, name, seed=0)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_shifted_initializers_change_step0_output(corpus_file):
    source = tiny_llama_source()
    model, tok = source.load()
    blocks = make_blocks(tok(TEXT)["input_ids"], 32, 0)
    stats = collect_lora_sb(model, [blocks.train[:2]], TARGETS, eta=1e-2).stats
    ids = blocks.eval[:1]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    apply_initializer(model, "lora_sb", seed=0, stats=stats)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".R") for n in trainable)  # only R trains (LoRA-XS form)


@pytest.mark.parametrize("name", ["loram_dst", "lora_sb"])
def test_saved_adapter_reloads_with_peft(tmp_path, name):
    source = tiny_llama_source()
    model, tok = source.load()
    blocks = make_blocks(tok(TEXT)["input_ids"], 32, 0)
    stats = collect_lora_sb(model, [blocks.train[:2]], TARGETS, eta=1e-2).stats if name == "lora_sb" else None
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    apply_initializer(model, name, seed=0, stats=stats)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):  # train a little so the adapter is not its init
        ids = blocks.batch(step, 2)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    merge_lora_sb(model)
    ids = blocks.eval[:2]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    # the base a user reloads onto: for function-preserving inits, the residual base weights
    residual_base = model.get_base_model()
    fresh_base, _ = source.load()
    fresh_base.load_state_dict({k.replace("base_layer.", ""): v for k, v in residual_base.state_dict().items()
                                if "lora_" not in k}, strict=True)
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter")
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_da_statistics_shapes_and_values():
    source = tiny_llama_source()
    model, tok = source.load()
    blocks = make_blocks(tok(TEXT)["input_ids"], 16, 0)
    got = collect_lora_da(model, blocks.train[:3], ["q_proj", "down_proj"], num_train=100)
    key = "base_model.model.model.layers.0.mlp.down_proj"
    stats = got.stats[key]
    assert stats.input_factor.shape == (128, 128) and stats.output_factor.shape == (64,)
    torch.testing.assert_close(stats.input_factor, stats.input_factor.mT)
    assert float(torch.linalg.eigvalsh(stats.input_factor).min()) > -1e-5  # PSD
    assert got.meta["tokens"] == 48 and stats.num_train == 100 and got.seconds > 0
    init = loram_ref.initialize("lora_da", model.get_submodule(key[len("base_model.model."):]).weight.detach(), 4, stats=stats)
    assert float(init.delta().norm()) > 0


def test_product_diff_norm_matches_dense():
    g = torch.Generator().manual_seed(0)
    b1, a1, b0, a0 = (torch.randn(*s, generator=g) for s in [(30, 4), (4, 20), (30, 4), (4, 20)])
    dense = float((b1 @ a1 - b0 @ a0).double().norm() ** 2)
    assert product_diff_norm_sq(b1, a1, b0, a0) == pytest.approx(dense, rel=1e-6)


def test_data_errors(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("   ")
    with pytest.raises(ValueError, match="holds no text"):
        file_corpus(empty)
    with pytest.raises(FileNotFoundError, match="--data file not found"):
        file_corpus(tmp_path / "missing.txt")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match="line 2 has no 'text' field"):
        file_corpus(bad)
    good = tmp_path / "g.jsonl"
    good.write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    assert file_corpus(good).text == "alpha\n\nbeta"
    with pytest.raises(ValueError, match="corpus too short"):
        make_blocks(list(range(10)), 8, 0)


def test_bad_config_is_rejected(tmp_path, corpus_file):
    with pytest.raises(ValueError, match="unknown initializer 'dora'"):
        run_loss(_config(corpus_file, initializers=["dora"]), tmp_path, progress=False, source=tiny_llama_source())
    with pytest.raises(ValueError, match="--steps must be an integer >= 1"):
        run_loss(_config(corpus_file, steps=0), tmp_path, progress=False, source=tiny_llama_source())


def test_cli_loss_saves_loadable_adapters(tmp_path, corpus_file):
    """--save-adapters writes the trained adapter in its plain form: it loads on the original,
    unmodified base (rank 2r for LoRAM, which rewrote W), and no model-sized residual."""
    import json

    config = _config(corpus_file, initializers=["loram_dst"], save_adapters=tmp_path / "adapters")
    rows = run_loss(config, tmp_path / "res", progress=False, source=tiny_llama_source())
    folder = tmp_path / "adapters" / "loram_dst-lr0.001-seed0"
    assert (folder / "adapter_config.json").is_file() and not (folder / "residual_base.safetensors").exists()
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2 * config.rank
    base, _ = tiny_llama_source().load()
    model = PeftModel.from_pretrained(base, folder)
    assert rows and any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_a_loss_file_cut_mid_write_reruns_that_run_without_duplicates(tmp_path, corpus_file):
    from reports.tables import load_results

    config = _config(corpus_file)
    run_loss(config, tmp_path, progress=False, source=tiny_llama_source())
    path = tmp_path / "loss.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1 + 25])  # loram_dst's summary cut off
    run_loss(config, tmp_path, progress=False, source=tiny_llama_source())
    loaded = load_results(tmp_path)
    assert sorted(loaded.loss_summary["initializer"]) == ["loram_dst", "noise_zeros"]
    steps = loaded.loss.groupby("initializer")["step"].apply(list).to_dict()
    assert steps == {"loram_dst": [1, 2, 3, 4], "noise_zeros": [1, 2, 3, 4]}  # nothing lost, nothing doubled
    assert "cut off" in (tmp_path / "loss.rejected.jsonl").read_text()


def test_a_rank_above_the_model_fails_before_any_training(tmp_path, corpus_file):
    with pytest.raises(ValueError, match="--rank 5000 exceeds the smallest target layer side"):
        run_loss(_config(corpus_file, rank=5000), tmp_path, progress=False, source=tiny_llama_source())
    assert not (tmp_path / "loss.jsonl").exists()
