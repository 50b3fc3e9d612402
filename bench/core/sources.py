"""What a ``loram_ref`` source tree registers, read from its files without importing it
(importing it imports torch): the command line's initializer choices, and the gate's
per-initializer code fingerprints of any revision."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path


def package_dir(name: str = "loram_ref") -> Path:
    """The folder of the installed package ``name``, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def registered_names(path: Path) -> list[str]:
    """Initializer names registered in one module: its ``@register("name", ...)`` decorators."""
    names = []
    for node in ast.walk(ast.parse(Path(path).read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in node.decorator_list:
                func = deco.func if isinstance(deco, ast.Call) else None
                called = getattr(func, "id", None) or getattr(func, "attr", None)
                if called == "register" and deco.args and isinstance(deco.args[0], ast.Constant) \
                        and isinstance(deco.args[0].value, str):
                    names.append(deco.args[0].value)
    return names


def initializer_names(package: Path | None = None) -> list[str]:
    """Every single-process initializer the package registers (its top-level modules, the
    ones ``loram_ref/__init__.py`` imports), sorted."""
    folder = package or package_dir()
    return sorted(n for path in folder.glob("*.py") for n in registered_names(path))
