"""The command line end to end on a tiny local config: run, report, errors."""

from __future__ import annotations

import json

import pytest

from bench.cli import main
from bench.results import read_rows

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}


@pytest.fixture()
def tiny_model(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


def test_run_then_report(tmp_path, tiny_model, capsys):
    out = tmp_path / "res"
    code = main(["run", "--preset", str(tiny_model), "--initializers", "loram_dst", "pissa", "--rank", "4",
                 "--values", "2", "--threads", "1", "--out", str(out), "--no-progress", "--report"])
    assert code == 0
    rows = read_rows(out / "init.jsonl")
    # unique shapes of the tiny model: 32x64 (k, v), 64x64 (q, o), 96x64 (gate, up), 64x96 (down)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert (out / "init.csv").is_file() and (out / "init.json").is_file() and (out / "report.html").is_file()
    assert "report:" in capsys.readouterr().out
    # a rerun finds everything done and measures nothing new
    assert main(["run", "--preset", str(tiny_model), "--initializers", "loram_dst", "pissa", "--rank", "4",
                 "--values", "2", "--threads", "1", "--out", str(out), "--no-progress"]) == 0
    assert len(read_rows(out / "init.jsonl")) == 8


@pytest.mark.parametrize("argv,message", [
    (["run", "--preset", "smollm2-135m", "--rank", "0"], "--rank must be an integer >= 1"),
    (["run", "--preset", "smollm2-135m", "--values", "0"], "--values must be >= 1"),
    (["run", "--preset", "smollm2-135m", "--limit", "0"], "--limit must be > 0"),
    (["run", "--preset", "gpt-5"], "unknown shape preset"),
    (["run", "--preset", "smollm2-135m", "--device", "tpu"], "--device must be 'cpu' or 'cuda"),
    (["loss", "--data", "/nonexistent/corpus.txt", "--model-path", "/nonexistent"], "not a Hugging Face model folder"),
])
def test_bad_arguments_are_clear_errors(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert message in captured.err + captured.out


def test_unknown_initializer_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--preset", "smollm2-135m", "--initializers", "olora"])
    assert "invalid choice: 'olora'" in capsys.readouterr().err
