"""Shape catalog against hand-computed Llama shapes."""

from __future__ import annotations

import json

import pytest

from bench.core.shapes import PRESETS, LayerShape, model_shapes, unique_shapes


def _by_role(shapes):
    return {s.role: (s.d_out, s.d_in, s.count) for s in shapes}


def test_llama_2_7b_by_hand():
    # hidden 4096, MLP 11008, 32 layers, MHA (32 KV heads)
    assert _by_role(model_shapes("llama-2-7b")) == {
        "q_proj": (4096, 4096, 32), "k_proj": (4096, 4096, 32), "v_proj": (4096, 4096, 32), "o_proj": (4096, 4096, 32),
        "gate_proj": (11008, 4096, 32), "up_proj": (11008, 4096, 32), "down_proj": (4096, 11008, 32),
    }


def test_llama_3_70b_by_hand():
    # hidden 8192, MLP 28672, 80 layers, 64 heads of 128, 8 KV heads -> k/v out 8 * 128 = 1024
    assert _by_role(model_shapes("llama-3-70b")) == {
        "q_proj": (8192, 8192, 80), "k_proj": (1024, 8192, 80), "v_proj": (1024, 8192, 80), "o_proj": (8192, 8192, 80),
        "gate_proj": (28672, 8192, 80), "up_proj": (28672, 8192, 80), "down_proj": (8192, 28672, 80),
    }


def test_parameter_totals_match_spec():
    total = lambda name: sum(s.d_out * s.d_in * s.count for s in model_shapes(name))
    assert total("llama-2-7b") == 6_476_005_376  # docs/initializers.md §7: 6.48B targeted parameters
    assert total("llama-3-70b") == 68_451_041_280  # docs/initializers.md §7: 68.5B


def test_every_preset_builds_and_lm_head_is_excluded():
    for name in PRESETS:
        shapes = model_shapes(name)
        assert shapes and all(s.role != "lm_head" for s in shapes)
        assert {"q_proj", "down_proj"} <= {s.role for s in shapes}


def test_unique_merges_roles_with_equal_shape():
    merged = unique_shapes(model_shapes("llama-3-8b"))
    assert [(s.key, s.count) for s in merged] == [("1024x4096", 64), ("4096x4096", 64), ("4096x14336", 32), ("14336x4096", 64)]
    assert merged[0].role == "k_proj+v_proj"


def test_local_config_json_and_folder(tmp_path):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for source in (tmp_path, tmp_path / "config.json"):
        shapes = _by_role(model_shapes(str(source)))
        assert shapes["k_proj"] == (32, 64, 3) and shapes["down_proj"] == (64, 96, 3)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown shape preset or config path 'llama-9b'; presets: .*llama-3-70b"):
        model_shapes("llama-9b")


def test_cli_shapes_prints_table(capsys):
    from bench.cli import main

    assert main(["shapes", "llama-3-70b"]) == 0
    out = capsys.readouterr().out
    assert "gate_proj" in out and "28672" in out and "68,451,041,280" in out
    assert main(["shapes", "nope"]) == 2
    assert "unknown shape preset" in capsys.readouterr().err


def test_layer_shape_helpers():
    s = LayerShape("q_proj", 8, 4, 3)
    assert s.key == "8x4" and s.numel == 32 and s.to_dict()["count"] == 3
