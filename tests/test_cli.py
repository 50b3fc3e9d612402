"""The command line end to end on a tiny local config: run, report, errors."""

from __future__ import annotations

import json

import pytest

from bench.cli import main
from bench.core.results import read_rows

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
    catalog = json.loads((out / "catalog.json").read_text())  # the report sums model totals from it
    assert str(tiny_model) in catalog and "llama-3-70b" in catalog
    assert sum(s["count"] for s in catalog[str(tiny_model)]) == 2 * 7
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
        main(["run", "--preset", "smollm2-135m", "--initializers", "dora"])
    assert "invalid choice: 'dora'" in capsys.readouterr().err


def _folder(tmp_path, name: str, config) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("make_argv,message", [
    (lambda t: ["run", "--preset", _folder(t, "bad", "{not json")], "is not a JSON config"),
    (lambda t: ["run", "--preset", _folder(t, "alien", {"model_type": "no-such-model"})], "model_type 'no-such-model' is not known"),
    (lambda t: ["run", "--preset", _folder(t, "t5", {"model_type": "t5", "d_model": 64, "num_layers": 1, "num_heads": 2,
                                                     "d_ff": 96, "d_kv": 32, "vocab_size": 100})], "has no causal-LM class"),
    (lambda t: ["run", "--preset", "smollm2-135m", "--limit", "inf"], "--limit must be > 0 and finite"),
    (lambda t: ["run", "--preset", "smollm2-135m", "--value-budget", "-1"], "--value-budget must be >= 0 and finite"),
    (lambda t: ["run", "--preset", "smollm2-135m", "--rank", "5000"], "no task: every layer shape"),
    (lambda t: ["loss", "--model-path", _folder(t, "noweights", TINY)], "holds no weights"),
    (lambda t: ["report", str(t / "nowhere")], "no results folder or file"),
])
def test_every_bad_input_is_one_line_and_a_nonzero_exit(make_argv, message, tmp_path, capsys):
    argv = make_argv(tmp_path)
    assert main([*argv, *([] if argv[0] == "report" else ["--out", str(tmp_path / "o")])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "nowhere").exists()  # report on a missing folder creates nothing


def test_an_unwritable_results_folder_is_one_line(tmp_path, tiny_model, capsys):
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "init.jsonl").mkdir()  # not a file
    assert main(["run", "--preset", str(tiny_model), "--initializers", "noise_zeros", "--rank", "4",
                 "--out", str(tmp_path / "res"), "--no-progress"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_a_rank_above_some_shapes_says_which_it_drops(tmp_path, tiny_model, capsys):
    assert main(["run", "--preset", str(tiny_model), "--initializers", "noise_zeros", "--rank", "40", "--values", "1",
                 "--threads", "1", "--out", str(tmp_path / "res"), "--no-progress"]) == 0
    assert "note: --rank 40 exceeds min(d_out, d_in) of 1 layer shape(s), not measured: 32x64" in capsys.readouterr().err


def test_compare_without_common_cells_says_so(tmp_path, capsys):
    from bench.core.results import append_row

    for name, d in (("a", 16), ("b", 32)):
        append_row(tmp_path / name / "init.jsonl", {"kind": "init", "initializer": "noise_zeros", "d_out": d, "d_in": d,
                                                    "rank": 4, "status": "ok", "values_s": [1.0, 1.0]})
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "no common cells" in capsys.readouterr().err


def test_memory_limit_sizes_parse():
    from bench.cli.args import parse_size

    assert parse_size("8GiB") == 8 << 30 and parse_size("512M") == 512 << 20 and parse_size("1.5g") == int(1.5 * (1 << 30))
    for bad in ("lots", "12 parsecs", "100"):
        with pytest.raises(Exception, match="not a size|below 1 MiB"):
            parse_size(bad)


def test_init_options_reach_the_initializer():
    from bench.cli.args import init_options as _init_options

    assert _init_options(["lora_da.solver=eigh", "lora_da.official_seed=9"], ["lora_da"]) == {
        "lora_da": {"solver": "eigh", "official_seed": 9}}
    for bad, message in ((["lora_da=eigh"], "use NAME.KEY=VALUE"), (["dora.x=1"], "unknown initializer"),
                         (["pissa.niter=2"], "not among --initializers")):
        with pytest.raises(ValueError, match=message):
            _init_options(bad, ["lora_da"])
