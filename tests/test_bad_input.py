"""Hostile input: each ends in one line naming the flag, file or field and what to do, exit 2.

Commands with bad flags or configs, and ``report`` on results folders whose rows were
tampered with (the rows the real commands wrote, ``conftest.planted_runs``). Sizes that
cannot fit are refused before any work; a run whose every measurement failed exits 1 with
a summary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.cli import main

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "architectures": ["LlamaForCausalLM"]}


def _exit(argv: list[str]) -> int:
    """``main``'s exit code, argparse's usage errors (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _config(tmp_path: Path, name: str, **fields) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY, **fields}))
    return str(folder)


def _tampered(planted_runs, tmp_path: Path, file: str, edit) -> str:
    """A copy of the real results folder with ``edit(row)`` applied to the last row of ``file``."""
    folder = tmp_path / "res"
    shutil.copytree(planted_runs.folder / "results", folder)
    path = folder / file
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    edit(rows[-1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def _drop(key):
    return lambda row: row.pop(key)


def _set(key, value):
    return lambda row: row.update({key: value})


#: (arguments, what the one line must say); ``t`` is the test's tmp folder.
COMMANDS = [
    (lambda t: ["loss", "--threads", "-1"], "--threads must be an integer >= 0"),
    (lambda t: ["layer-loss", "--shapes", "96x96", "--threads", "-1"], "--threads must be an integer >= 0"),
    (lambda t: ["sharded", "--world-size", "1", "--shape", "32x32", "--threads", "-1"],
     "--threads (per rank) must be an integer >= 0"),
    (lambda t: ["run", "--shape", "32x32", "--threads", "1000"], "--threads 1000 exceeds the"),
    (lambda t: ["layer-loss", "--shapes", "96x96", "--initializers", "noise_zeros", "--init-option", "noise_zeros.bogus=1"],
     "'bogus' is not a keyword of noise_zeros; noise_zeros takes seed"),
    (lambda t: ["layer-loss", "--shapes", "96x96", "--initializers", "lora_sb", "--init-option", "lora_sb.stats=1"],
     "'stats' is set by the harness"),
    (lambda t: ["run", "--shape", "32x32", "--memory-limit", "99999999999999T"], "argument --memory-limit: 99999999999999T"),
    (lambda t: ["run", "--shape", "-8x8"], "argument --shape: not a shape: '-8x8'"),
    (lambda t: ["shapes", _config(t, "heads0", num_attention_heads=0)], "field 'num_attention_heads' must be a positive"),
    (lambda t: ["shapes", _config(t, "abc", hidden_size="abc")], "field 'hidden_size' must be a positive integer, got 'abc'"),
    (lambda t: ["shapes", _config(t, "bert", model_type="bert", architectures=["BertForMaskedLM"])],
     "architectures BertForMaskedLM is not a causal LM"),
    (lambda t: ["shapes", _config(t, "encoder", model_type="bert", architectures=None)], "is an encoder (masked LM)"),
    (lambda t: ["shapes", _config(t, "deep", num_hidden_layers=3_000_000)], "field 'num_hidden_layers' is 3,000,000"),
    (lambda t: ["shapes", str(Path(t / "empty").mkdir() or t / "empty")], "is a folder without config.json"),
    (lambda t: ["run", "--shape", "200000x200000", "--initializers", "pissa"], "200000x200000 float32 (298 GiB)"),
    (lambda t: ["layer-loss", "--shapes", "100000x100000", "--initializers", "noise_zeros"], "100000x100000 (74.5 GiB)"),
    (lambda t: ["sharded", "--world-size", "1", "--shape", "100000x100000", "--initializers", "noise_zeros"],
     "100000x100000 float32 (112 GiB)"),
]


@pytest.mark.parametrize("make_argv,message", COMMANDS, ids=[str(i) for i in range(len(COMMANDS))])
def test_a_bad_command_is_one_line_and_exit_2(make_argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = make_argv(tmp_path)
    out = [] if argv[0] == "shapes" else ["--out", str(tmp_path / "o"), "--no-progress"]
    assert _exit([*argv, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # refused before any work


#: (results file, edit of its last row, what the line must say)
ROWS = [
    ("layer_loss.jsonl", _drop("task_key"), "layer_loss.jsonl:{n}: a layer_loss row needs field 'task_key'"),
    ("init.jsonl", _set("runs", "oops"), "init.jsonl:{n}: field 'runs' must be a list, got 'oops'"),
    ("layer_loss.jsonl", _set("final_loss", "abc"), "layer_loss.jsonl:{n}: field 'final_loss' must be a number"),
    ("sharded.jsonl", _set("world_size", "two"), "sharded.jsonl:{n}: field 'world_size' must be an integer >= 1"),
    ("init.jsonl", _set("dtype", "float8"), "init.jsonl:{n}: field 'dtype' must be one of float32, bfloat16"),
    ("init.jsonl", _set("median_s", float("inf")), "init.jsonl:{n}: field 'median_s' must be finite"),
    ("sharded.jsonl", lambda row: [row.pop(k) for k in list(row) if k != "kind"],
     "sharded.jsonl:{n}: a sharded row needs field 'initializer'"),
]


@pytest.mark.parametrize("file,edit,message", ROWS, ids=[m.split(":")[2].strip()[:40] for _, _, m in ROWS])
def test_report_refuses_a_tampered_row_naming_file_line_and_field(planted_runs, tmp_path, capsys, file, edit, message):
    folder = _tampered(planted_runs, tmp_path, file, edit)
    lines = (Path(folder) / file).read_text().splitlines()
    page = Path(folder) / "report.html"
    page.write_text("the page before")
    assert _exit(["report", folder]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(n=len(lines)) in err[0] and "fix or delete that line" in err[0], err
    assert page.read_text() == "the page before"  # nothing was written


def test_report_names_a_corrupt_catalog(planted_runs, tmp_path, capsys):
    folder = tmp_path / "res"
    shutil.copytree(planted_runs.folder / "results", folder)
    (folder / "catalog.json").write_text("{not json")
    assert _exit(["report", str(folder)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "catalog.json is not valid JSON" in line and "delete it" in line


def test_a_layer_task_of_the_reference_alone_still_reports(planted_runs, tmp_path):
    folder = tmp_path / "res"
    folder.mkdir()
    rows = (planted_runs.folder / "results" / "layer_loss.jsonl").read_text().splitlines()
    kept = [line for line in rows if json.loads(line)["initializer"] == "noise_zeros"]
    (folder / "layer_loss.jsonl").write_text("\n".join(kept) + "\n")
    assert _exit(["report", str(folder)]) == 0
    assert "No difference to noise_zeros to draw" in (folder / "report.html").read_text()


def test_a_writer_sets_a_tampered_row_aside_and_measures_its_cell_again(planted_runs, tmp_path, capsys):
    folder = Path(_tampered(planted_runs, tmp_path, "init.jsonl", _set("runs", "oops")))
    before = (folder / "init.jsonl").read_text().splitlines()
    threads = str(json.loads(before[0])["threads"])  # the same cells as the planted run's (threads is identity)
    assert _exit(["run", "--shape", "32x32", "--initializers", "noise_zeros", "loram_dst", "--values", "1",
                  "--processes", "1", "--threads", threads, "--no-floor", "--out", str(folder), "--no-progress"]) == 0
    rejected = [json.loads(line) for line in (folder / "init.rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [len(before)] and "field 'runs' must be a list" in rejected[0]["why"]
    assert f"init.jsonl:{len(before)}: field 'runs'" in capsys.readouterr().err
    rows = [json.loads(line) for line in (folder / "init.jsonl").read_text().splitlines()]
    assert len(rows) == len(before) and all(isinstance(r["runs"], list) for r in rows)


def test_every_measurement_failing_exits_1_with_a_summary(tmp_path, capsys):
    # a 16 MiB weight under a 4 MiB cap: every worker fails allocating it
    code = _exit(["run", "--shape", "2048x2048", "--initializers", "pissa", "noise_zeros", "--memory-limit", "4MiB",
                  "--no-floor", "--values", "1", "--processes", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert "2 measurements this run: " in captured.out
    assert captured.err.strip().splitlines()[-1].startswith("error: every one of the 2 measurements failed")


def test_more_ranks_than_cores_is_said_before_the_launch(capsys):
    from bench.core.checks import available_cores, check_world_size

    check_world_size([1, available_cores() + 1], "cpu")
    assert f"--world-size {available_cores() + 1} on {available_cores()} core(s)" in capsys.readouterr().err
    check_world_size([1], "cpu")
    assert capsys.readouterr().err == ""
