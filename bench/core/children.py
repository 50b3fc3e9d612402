"""How every child process of the harness starts: with the working folder off its import path.

A ``python -c`` or ``python -m`` child puts its working folder first on ``sys.path``, so a
``json.py`` (or ``torch.py``, ``loram_ref.py``) in the folder a user runs ``loram-bench``
from would be imported by the fork server (the parent of every worker), by spawned
workers, by the calibration and by every ``torchrun`` rank. Every child therefore starts
with

* ``PYTHONSAFEPATH=1`` (Python 3.11+): neither ``-c``, ``-m`` nor a script adds its folder
  or the working folder to ``sys.path``; the children's children (``torchrun``'s ranks)
  inherit it;
* ``PYTHONPATH`` without empty entries and without entries that are the working folder;
* for the fork server, whose ``sys.path`` is copied from this process, this process's
  ``sys.path`` cleaned the same way (:func:`import_path`), when the server starts and
  whenever it forks a worker (:func:`forked_child_context`), and no re-import of this
  process's ``__main__`` in the worker.

The harness stays importable: where ``bench`` would not be found by a child without it
(loram-bench run from an uninstalled checkout), the folder holding ``bench`` is added at
the end. An installed or ``pip install -e`` checkout never needs it.
"""

from __future__ import annotations

import importlib.machinery
import os
import site
import sys
from contextlib import contextmanager
from pathlib import Path

#: The variables every child gets (see the module docstring).
SAFE_ENV = {"PYTHONSAFEPATH": "1"}
#: The folder holding the ``bench`` package.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _is_working_folder(entry: str, cwd: Path) -> bool:
    if entry in ("", "."):
        return True
    try:
        return Path(entry).resolve() == cwd
    except OSError:
        return False


def _bench_found(path: list[str]) -> bool:
    """Whether ``import bench`` would succeed with ``path`` as the search path (meta-path
    finders, such as an editable install's, count: they do not read the path)."""
    for finder in sys.meta_path:
        try:
            spec = finder.find_spec("bench", path if finder is importlib.machinery.PathFinder else None)
        except (AttributeError, ImportError, TypeError, ValueError):
            spec = None
        if spec is not None:
            return True
    return False


def _site_dirs() -> list[str]:
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return dirs


def _cleaned(entries: list[str], searched_too: list[str], keep_working_folder: bool = False) -> list[str]:
    cwd = Path.cwd().resolve()
    kept = [e for e in entries if e and (keep_working_folder or not _is_working_folder(e, cwd))]
    if not _bench_found(kept + searched_too):
        kept.append(PACKAGE_ROOT)
    return kept


def defined_in_working_folder(fn) -> bool:
    """Whether the module of ``fn`` (a worker's target; a ``functools.partial`` is looked
    through) is a file in the working folder: a test's own worker function, which its
    child must import from there."""
    import importlib.util

    module = getattr(getattr(fn, "func", fn), "__module__", None)
    if not module or module == "__main__":
        return False
    try:
        origin = getattr(importlib.util.find_spec(module), "origin", None)
    except (ImportError, ValueError):
        return False
    return bool(origin) and Path(origin).resolve().is_relative_to(Path.cwd().resolve())


def import_path(entries: list[str] | None = None, keep_working_folder: bool = False) -> list[str]:
    """``entries`` (default: this process's ``sys.path``) without the working folder and
    empty entries (unless ``keep_working_folder``), plus :data:`PACKAGE_ROOT` where
    ``bench`` is not found otherwise."""
    return _cleaned(list(sys.path if entries is None else entries), [], keep_working_folder)


@contextmanager
def forked_child_context(fn):
    """Around starting a forked worker: what the fork server hands the child.

    Python's fork server sends each child this process's ``sys.path`` and has it re-import
    this process's ``__main__`` module (a user's script, the ``pytest`` runner: about 1 s
    under pytest, and code from the working folder). A worker needs neither: its target is
    a function of an importable module. So while the child is started, ``sys.path`` is
    cleaned (:func:`import_path`; the working folder stays only when ``fn`` is defined
    there, as a test's worker is) and ``__main__`` is a bare module with nothing to import.
    """
    import types

    saved_path, saved_main = list(sys.path), sys.modules.get("__main__")
    sys.path[:] = import_path(saved_path, keep_working_folder=defined_in_working_folder(fn))
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.path[:] = saved_path
        if saved_main is not None:
            sys.modules["__main__"] = saved_main


def child_env(extra: dict[str, str] | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """A child's environment: ``base`` (default ``os.environ``) with :data:`SAFE_ENV` and
    ``extra``, its ``PYTHONPATH`` cleaned of the working folder (see the module docstring)."""
    env = {**(os.environ if base is None else base), **SAFE_ENV, **(extra or {})}
    path = _cleaned(env.get("PYTHONPATH", "").split(os.pathsep), _site_dirs())
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    else:
        env.pop("PYTHONPATH", None)
    return env
