"""The adoption API (``loram_ref.peft``) on a tiny causal LM made from a seed
(``bench.adopt.models.tiny_llama``: no files), with real PEFT and transformers: every
initializer through ``initialize``, a few optimizer steps, the plain LoRA on a fresh base,
``merge_and_unload``, a ``transformers.Trainer`` run, bad input.

Tolerances (fp32 models): logits of a function-preserving or zero-product init equal the
base model's to 1e-5 (the residual's fp32 rounding, through two decoder layers); the plain
adapter on the original base gives the trained model's logits to 1e-4, the difference
being W − s·B₀·A₀ − W_res, the residual's rounding (docs/adoption.md).
"""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import loram_ref  # noqa: E402
from bench.adopt.models import TINY_VOCAB, tiny_llama, train_steps  # noqa: E402
from loram_ref import Invariant  # noqa: E402
from loram_ref.peft import collect_statistics, initialize, plain_adapter, save_as_plain_lora  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
LOGITS_TOL = 1e-5
PLAIN_TOL = 1e-4


def tiny_lm(seed: int = 0, dtype=torch.float32):
    return tiny_llama(seed, dtype)


def token_ids(count: int = 16, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def lora(model, **kw):
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    config.update(kw)
    return get_peft_model(model, LoraConfig(**config))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def base_weights(model) -> dict[str, torch.Tensor]:
    """The base model's tensors by their names in the base model (PEFT's ``.base_layer`` dropped)."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in inner.state_dict().items() if "lora_" not in k}


def train(model, ids, steps: int = 3, lr: float = 1e-2) -> None:
    assert any(p.requires_grad for p in model.parameters()), "nothing trains"
    train_steps(model, ids, steps, lr, batch_size=4)


NAMES = sorted(loram_ref.INITIALIZERS)


@pytest.mark.parametrize("name", NAMES)
def test_initialize_keeps_the_invariant_the_registry_states(name):
    spec = loram_ref.get_initializer(name)
    ids = token_ids()
    base = tiny_lm()
    reference = logits(base, ids[:3])
    before = base_weights(base)
    model = lora(base)
    report = initialize(model, name, data=ids, lr=1e-3)
    assert report.invariant is spec.invariant and report.invariant_holds is True
    assert len(report.layers) == 2 * len(TARGETS)
    assert all(layer.seconds >= 0 and layer.w_norm > 0 for layer in report.layers)
    if spec.needs_statistics:
        assert report.stats_samples == len(ids)
    after = base_weights(model)
    got = logits(model, ids[:3])
    if spec.invariant in (Invariant.FUNCTION_PRESERVING, Invariant.ZERO_PRODUCT):
        assert float((got - reference).abs().max()) <= LOGITS_TOL
    if spec.invariant is Invariant.SHIFTED:
        assert float((got - reference).abs().max()) > LOGITS_TOL  # the shift is the method's point
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert bool(changed) == spec.invariant.rewrites_weight
    assert all(k.endswith(".weight") and k.rsplit(".", 2)[-2] in TARGETS for k in changed)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if spec.trains == ("R",):
        assert trainable and all(n.endswith(".R") for n in trainable)
    else:
        assert {f for f in ("A", "B") if any(f".lora_{f}." in n for n in trainable)} == set(spec.trains)


@pytest.mark.parametrize("name", [n for n in NAMES if loram_ref.get_initializer(n).invariant is not Invariant.QUANTIZED])
def test_the_plain_adapter_reproduces_the_trained_model_on_the_original_base(tmp_path, name):
    spec = loram_ref.get_initializer(name)
    ids = token_ids()
    model = lora(tiny_lm())
    initialize(model, name, data=ids, lr=1e-3)
    at_init = logits(model, ids[:3])
    train(model, ids)
    trained = logits(model, ids[:3])
    assert float((trained - at_init).abs().max()) > 1e-3  # the steps moved the adapter
    plain = save_as_plain_lora(model, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    rewrote = spec.invariant is Invariant.FUNCTION_PRESERVING
    assert config["r"] == (8 if rewrote else 4) and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(16.0 if rewrote else 8.0)  # s = α'/r' = 2 either way
    assert len(plain.combined) == (2 * len(TARGETS) if rewrote else 0)
    fresh = PeftModel.from_pretrained(tiny_lm(), tmp_path / "plain").eval()
    assert float((logits(fresh, ids[:3]) - trained).abs().max()) <= PLAIN_TOL
    merged_trained = model.merge_and_unload()
    merged_plain = fresh.merge_and_unload()
    assert float((logits(merged_trained, ids[:3]) - trained).abs().max()) <= PLAIN_TOL
    assert float((logits(merged_plain, ids[:3]) - trained).abs().max()) <= PLAIN_TOL


def test_rank_pattern_and_rslora_survive_the_plain_conversion(tmp_path):
    """Layers of different ranks under rsLoRA: each layer's α' keeps its scaling at rank 2r."""
    ids = token_ids()
    model = lora(tiny_lm(), use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3.0})
    initialize(model, "pissa")
    train(model, ids)
    trained = logits(model, ids[:3])
    plain = save_as_plain_lora(model, tmp_path)
    assert set(plain.ranks.values()) == {8, 4}
    fresh = PeftModel.from_pretrained(tiny_lm(), tmp_path).eval()
    assert float((logits(fresh, ids[:3]) - trained).abs().max()) <= PLAIN_TOL


def test_a_quantized_base_has_no_plain_form():
    model = lora(tiny_lm())
    initialize(model, "loftq")
    with pytest.raises(ValueError, match="quantized"):
        plain_adapter(model)


def test_a_trainer_run_works_on_an_initialized_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    ids = token_ids(count=8)
    for name in ("pissa_rsvd", "lora_sb"):  # a rewritten base; a parametrized lora_A (LoRA-SB's R)
        model = lora(tiny_lm())
        initialize(model, name, data=ids, lr=1e-3)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        dataset = [{"input_ids": row, "labels": row} for row in ids]
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                                 use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        result = Trainer(model=model, args=args, train_dataset=dataset).train()
        assert result.global_step == 3 and result.training_loss == result.training_loss  # finite, not NaN
        moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
        assert moved, f"{name}: the Trainer's steps changed nothing"


def test_the_data_forms_give_the_same_statistics():
    """A tensor, an iterable of mappings and a callable; padding behind an attention mask
    changes nothing (the masked tokens are left out of every input sum)."""
    ids = token_ids(count=8, length=10)
    model = lora(tiny_lm())
    from_tensor, _ = collect_statistics(model, "eva", ids, batch_size=4)
    mappings = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 10, dtype=torch.long)} for i in (0, 4)]
    from_maps, _ = collect_statistics(model, "eva", mappings)
    from_callable, _ = collect_statistics(model, "eva", lambda: iter(mappings))
    padded = [{"input_ids": torch.cat([m["input_ids"], torch.zeros(4, 3, dtype=torch.long)], dim=1),
               "attention_mask": torch.cat([m["attention_mask"], torch.zeros(4, 3, dtype=torch.long)], dim=1)}
              for m in mappings]
    from_padded, meta = collect_statistics(model, "eva", padded)
    assert meta["samples"] == 8
    for other in (from_maps, from_callable, from_padded):
        for layer, stats in from_tensor.items():
            assert other[layer].tokens == stats.tokens == 80
            torch.testing.assert_close(other[layer].second_moment, stats.second_moment, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(other[layer].mean, stats.mean, rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # the pass restored them


def test_the_statistics_are_the_base_models_own():
    """With the adapter disabled during the pass, a shifted adapter does not leak into the
    gradients: the same statistics as on a model whose adapter is still PEFT's zero-B one."""
    ids = token_ids(count=8)
    plain, _ = collect_statistics(lora(tiny_lm(), init_lora_weights=True), "lora_ga", ids)
    shifted = lora(tiny_lm())
    initialize(shifted, "lora_one", data=ids)  # B·A ≠ 0 now
    again, _ = collect_statistics(shifted, "lora_ga", ids)
    for layer, stats in plain.items():
        torch.testing.assert_close(again[layer].grad, stats.grad, rtol=1e-5, atol=1e-7)


def test_the_same_seed_gives_the_same_adapter_as_the_benchmark():
    from bench.loss.apply import apply_initializer

    one, two = lora(tiny_lm()), lora(tiny_lm())
    initialize(one, "loram_rorth", seed=3)
    apply_initializer(two, "loram_rorth", seed=3)
    for (n1, p1), (n2, p2) in zip(one.named_parameters(), two.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_a_fan_in_fan_out_model_gpt2():
    """GPT-2's Conv1D stores W transposed (fan_in_fan_out): the weight is read and written
    as d_out x d_in, and the function is preserved."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32)).eval()
    ids = token_ids()
    reference = logits(base, ids[:2])
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                            init_lora_weights=False))
    report = initialize(model, "pissa")
    assert report.invariant_holds is True
    assert float((logits(model, ids[:2]) - reference).abs().max()) <= LOGITS_TOL


def test_the_report_table_names_every_layer():
    lines: list[str] = []
    report = initialize(lora(tiny_lm()), "olora", progress=lines.append)
    text = report.table()
    assert len(lines) == 2 * len(TARGETS) and lines[0].startswith("[1/10] model.layers.0.self_attn.q_proj")
    assert "holds" in text and text.count("model.layers.") == 2 * len(TARGETS)


def test_bad_input_names_what_to_change():
    ids = token_ids()
    with pytest.raises(TypeError, match="peft.PeftModel"):
        initialize(tiny_lm(), "pissa")
    model = lora(tiny_lm())
    with pytest.raises(ValueError, match="adapter_name 'other'"):
        initialize(model, "pissa", adapter_name="other")
    with pytest.raises(ValueError, match="unknown initializer"):
        initialize(model, "nope")
    with pytest.raises(ValueError, match="needs data"):
        initialize(model, "corda")
    with pytest.raises(ValueError, match="needs lr="):
        initialize(model, "lora_sb", data=ids)
    with pytest.raises(TypeError, match="data must be"):
        initialize(model, "eva", data=3)
    with pytest.raises(ValueError, match="batch 0 is a mapping without 'input_ids'"):
        initialize(model, "eva", data=[{"ids": ids}])
    with pytest.raises(ValueError, match="2-D integer"):
        initialize(model, "eva", data=ids.float())
    with pytest.raises(ValueError, match="rank 3"):
        initialize(lora(tiny_lm(), r=3), "orthogonal")
    with pytest.raises(ValueError, match="use_dora"):
        initialize(lora(tiny_lm(), use_dora=True), "pissa")
    initialize(model, "pissa")
    with pytest.raises(ValueError, match="rewrote the base weights"):
        initialize(model, "olora")
    with pytest.raises(ValueError, match="not initialized by loram_ref"):
        plain_adapter(lora(tiny_lm(), init_lora_weights=True))


def test_a_failed_call_leaves_the_base_weights_as_they_were(monkeypatch):
    model = lora(tiny_lm())
    before = base_weights(model)
    import loram_ref.peft.init as module

    calls = []
    real = module.write

    def failing(param, value):
        calls.append(1)
        if len(calls) == 5:  # the third layer's first factor, before its residual is written
            raise RuntimeError("planted")
        return real(param, value)

    monkeypatch.setattr(module, "write", failing)
    with pytest.raises(RuntimeError, match="planted"):
        initialize(model, "pissa")
    after = base_weights(model)
    # the layers before the failure were initialized; the failing one was put back
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"}


def test_the_documented_example_runs(capsys):
    """docs/adoption.md's first Python block, executed as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "adoption.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "docs/adoption.md", "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    gap = float(re.search(r"logits within (\S+) of the trained model", out).group(1))
    assert "holds" in out and gap <= PLAIN_TOL


def test_options_reach_the_initializer_and_unknown_ones_are_refused():
    one, two = lora(tiny_lm()), lora(tiny_lm())
    initialize(one, "pissa_rsvd", niter=1)
    initialize(two, "pissa_rsvd", options={"niter": 1, "seed": 5})  # a keyword named like initialize's own
    a1 = one.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    a2 = two.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(a1, a2)  # the per-layer generator, seeded from initialize's seed, takes precedence
    fresh = lora(tiny_lm())
    before = base_weights(fresh)
    with pytest.raises(TypeError, match="niterations"):
        initialize(fresh, "pissa_rsvd", niterations=3)
    after = base_weights(fresh)
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before any layer was written


def test_max_samples_stops_the_pass_and_progress_is_reported(capsys):
    ids = token_ids(count=12)
    model = lora(tiny_lm())
    _, meta = collect_statistics(model, "eva", ids, batch_size=4, max_samples=5, progress=True)
    assert meta["samples"] == 8  # the batch that crosses the limit counts whole
    assert "eva: statistics pass, 8 samples" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no batches"):
        collect_statistics(model, "eva", [])
