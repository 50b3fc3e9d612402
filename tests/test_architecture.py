"""The architecture, checked: the folder list is the layering, imports go one way, no
cycles, and an initializer registers by existing, with the keywords it takes declared."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("loram_ref", "bench", "reports")

#: What each layer may import (besides itself and third-party packages). The benchmarks
#: import only the shared layer; the gate measures init cost on two trees, so it builds on
#: the init-cost harness; the report reads every benchmark's rows; the command line is on top.
ALLOWED = {
    "loram_ref": set(),
    "bench.core": {"loram_ref"},
    "bench.initcost": {"loram_ref", "bench.core"},
    "bench.loss": {"loram_ref", "bench.core"},
    "bench.layer": {"loram_ref", "bench.core"},
    "bench.sharded": {"loram_ref", "bench.core"},
    "bench.adopt": {"loram_ref", "bench.core"},
    "bench.gate": {"loram_ref", "bench.core", "bench.initcost"},
    "reports": {"loram_ref", "bench.core", "bench.initcost", "bench.loss", "bench.layer", "bench.sharded"},
    "bench.cli": {"loram_ref", "bench.core", "bench.initcost", "bench.loss", "bench.layer", "bench.sharded",
                  "bench.adopt", "bench.gate", "reports"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for top in PROJECT:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body (function-level imports
    too; ``if TYPE_CHECKING:`` blocks are annotations, not imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in PROJECT)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] not in PROJECT:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in known else module)
    return {m for m in found if m != name}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _layer(module: str) -> str:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return module


def test_every_module_lives_in_a_layer():
    assert {m for m in _modules() if _layer(m) not in ALLOWED} == {"bench"}  # the namespace itself


def test_imports_go_one_way():
    wrong = []
    for module, deps in _graph().items():
        here = _layer(module)
        for dep in deps:
            there = _layer(dep)
            if there != here and there not in ALLOWED.get(here, set()):
                wrong.append(f"{module} imports {dep} ({here} may import only {sorted(ALLOWED.get(here, ()))})")
    assert wrong == []


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]) if dep in stack else f"{node} -> {dep}")
            elif dep in graph and state.get(dep) is None:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node, [node])
    assert cycles == []


def test_the_architecture_check_sees_an_upward_import(tmp_path):
    """The check itself: a benchmark module that imported another benchmark is reported."""
    known = {"bench.loss.run": tmp_path / "run.py", "bench.layer.task": tmp_path / "task.py"}
    (tmp_path / "run.py").write_text("def f():\n    from bench.layer.task import LayerTask\n")
    deps = _imports("bench.loss.run", known["bench.loss.run"], known)
    assert deps == {"bench.layer.task"} and _layer("bench.layer.task") not in ALLOWED[_layer("bench.loss.run")]


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["loss", "--help"], ["layer-loss", "--help"],
                                  ["continuous", "--help"], ["sharded", "--help"], ["quick", "--help"]])
def test_help_imports_no_torch_and_shows_every_default(argv):
    code = ("import sys\nfrom bench.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'pandas', 'numpy', 'scipy') if m in sys.modules)\n"
            "print('IMPORTED', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout, out.stdout[-300:]


def test_every_flag_has_help_and_shows_its_default():
    import argparse

    from bench.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for command, sub in subs.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{command} {'/'.join(action.option_strings) or action.dest}: no help")
            elif action.option_strings and not action.required \
                    and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) \
                    and "(default: " not in formatter._get_help_string(action):
                missing.append(f"{command} {action.option_strings[0]}: no default shown")
    assert missing == []


def test_the_initializer_choices_are_read_from_the_source():
    import loram_ref

    from bench.core.sources import initializer_names

    assert initializer_names() == sorted(loram_ref.INITIALIZERS)


def test_every_initializer_module_is_imported():
    """A module that registers an initializer is found on disk, not listed by hand."""
    import loram_ref

    from bench.core.sources import registered_names

    for path in sorted((ROOT / "loram_ref").glob("*.py")):
        for name in registered_names(path):
            assert path.stem in loram_ref.MODULES and name in loram_ref.INITIALIZERS, (path, name)


def test_harness_keywords_are_declared_not_guessed():
    import torch

    from loram_ref.registry import INITIALIZERS, register
    from loram_ref.result import LoraInit

    def drawn(weight, rank, scaling=1.0, *, rng=None):
        m, n = weight.shape
        return LoraInit("drawn", A=torch.randn(rank, n, generator=rng), B=torch.zeros(m, rank), scaling=scaling)

    def forgot(weight, rank, scaling=1.0, *, generator=None):
        return drawn(weight, rank, scaling, rng=generator)

    common = dict(invariant="Z", paper="-", summary="test")
    with pytest.raises(ValueError, match="takes 'generator' without declaring it"):
        register("forgot", **common)(forgot)
    with pytest.raises(ValueError, match="which drawn does not take"):
        register("drawn", harness=("generator",), **common)(drawn)
    register("drawn", harness={"generator": "rng"}, **common)(drawn)
    try:
        spec = INITIALIZERS["drawn"]
        gen = torch.Generator().manual_seed(3)
        assert spec.harness_kwargs(generator=gen, inplace=True) == {"rng": gen}
        with pytest.raises(ValueError, match="unknown harness role"):
            spec.harness_kwargs(rank=3)
    finally:
        INITIALIZERS.pop("drawn")
    assert "forgot" not in INITIALIZERS


def test_the_suites_register_every_worker_before_the_fork_server_starts():
    """The quick suite starts the fork server with its init cells; the layer task's worker
    module must be preloaded by then (its AdamW import costs a cold worker 1.3 s)."""
    code = ("import bench.cli.suites\nfrom bench.core import launchers\n"
            "assert launchers._FORK_SERVER is None\nprint(sorted(launchers._PRELOAD))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'bench.initcost.worker'" in out.stdout and "'bench.layer.worker'" in out.stdout, out.stdout


def test_a_tree_from_before_declared_roles_still_gets_its_keywords():
    """The gate's base side may run a ``loram_ref`` whose registry entries declare no roles:
    the worker then reads them from the function's keywords."""
    from types import SimpleNamespace

    from bench.initcost.worker import measurement_kwargs

    def old(weight, rank, scaling=1.0, *, inplace=False, check_input=True, generator=None):
        raise AssertionError("not called")

    def plain(weight, rank, scaling=1.0, *, generator=None):
        raise AssertionError("not called")

    assert measurement_kwargs(SimpleNamespace(fn=old)) == {"inplace": True, "check_input": False}
    assert measurement_kwargs(SimpleNamespace(fn=plain)) == {}
