"""Source trees a worker takes ``loram_ref`` from: the working tree, or a git revision
checked out into a temporary worktree (``git worktree add --detach``).

The harness (``bench``) is always the running one: only the initializers change sides,
so two revisions are measured by the same measuring code. A forked worker drops the
fork server's ``loram_ref``, puts its tree first on ``sys.path`` and imports it afresh
(both sides do, so both pay the same import in their set-up phase, never in a timed
region); a spawned worker (CUDA) runs ``python -m bench.gate.trees TREE_JSON``.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bench.core.environment import package_fingerprint
from bench.core.sources import registered_names

PACKAGE = "loram_ref"


@dataclass(frozen=True)
class Tree:
    """One side of a comparison: a label, the folder holding ``loram_ref/``, its commit,
    the content hash of its ``loram_ref`` (:func:`fingerprint`) and planted slowdowns."""

    label: str
    root: str
    commit: str = ""
    fingerprint: str = ""
    slow_down: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Tree":
        return cls(**json.loads(text))


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=120)


def checkout_root() -> Path:
    """The git checkout this loram-bench runs from (the working tree of a comparison)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / PACKAGE).is_dir() or _git(root, "rev-parse", "--git-dir").returncode != 0:
        raise ValueError(f"continuous compares git revisions, but loram-bench runs from {root}, which is not a git "
                         "checkout holding loram_ref/; install it from a clone (`pip install -e .`)")
    return root


def resolve_revision(root: Path, rev: str) -> str:
    """The full commit of ``rev`` in the repository at ``root``; a clear error if it names none."""
    if not rev or rev.startswith("-"):
        raise ValueError(f"BASE_REV {rev!r} is not a revision (e.g. HEAD~1, main, a commit)")
    out = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if out.returncode != 0:
        hint = " (a shallow clone lacks parents: fetch with more depth)" if "~" in rev or "^" in rev else ""
        raise ValueError(f"BASE_REV {rev!r} names no commit in {root}{hint}")
    return out.stdout.strip()


def head_commit(root: Path) -> tuple[str, bool]:
    """``(HEAD's commit, whether loram_ref has uncommitted changes)``."""
    commit = _git(root, "rev-parse", "HEAD").stdout.strip()
    dirty = bool(_git(root, "status", "--porcelain", "--", PACKAGE).stdout.strip())
    return commit, dirty


def fingerprint(root: Path | str) -> str:
    """A hash of every ``.py`` file under ``root/loram_ref`` (path and bytes): equal
    fingerprints mean the two sides run the same initializer code."""
    return package_fingerprint(root, PACKAGE)


def _reexports(package: Path) -> dict[str, Path]:
    """Names the package's ``__init__.py`` imports from its modules (``from .x import NAME``)."""
    import ast

    init = package / "__init__.py"
    out: dict[str, Path] = {}
    for node in ast.walk(ast.parse(init.read_text(), filename=str(init))):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            target = package.joinpath(*node.module.split("."))
            file = target.with_suffix(".py") if target.with_suffix(".py").is_file() else target / "__init__.py"
            for alias in node.names:
                out[alias.asname or alias.name] = file
    return out


def _imported_files(path: Path, package: Path, reexports: dict[str, Path]) -> set[Path]:
    """The files of ``package`` the module at ``path`` imports: every module named by an
    import statement anywhere in it (function-level imports too), relative or absolute, the
    ``__init__.py`` of each subpackage on the way, and for a name taken from the package
    itself (``from . import NAME``) the module its ``__init__.py`` takes that name from."""
    import ast

    here = path.parent  # the package the module is in (a package's __init__ is in its own folder)
    found: set[Path] = set()

    def add(folder: Path, parts: list[str]) -> None:
        for i in range(1, len(parts)):  # each subpackage on the way
            if (folder.joinpath(*parts[:i]) / "__init__.py").is_file():
                found.add(folder.joinpath(*parts[:i]) / "__init__.py")
        target = folder.joinpath(*parts)
        if parts and target.with_suffix(".py").is_file():
            found.add(target.with_suffix(".py"))
        elif (target / "__init__.py").is_file():
            found.add(target / "__init__.py")

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.parent
                parts = node.module.split(".") if node.module else []
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                base, parts = package, node.module.split(".")[1:]
            else:
                continue
            add(base, parts)
            for alias in node.names:  # `from . import x`: a module, or a name the package re-exports
                target = base.joinpath(*parts, alias.name)
                if target.with_suffix(".py").is_file() or (target / "__init__.py").is_file():
                    add(base, [*parts, alias.name])
                elif base.joinpath(*parts) == package and alias.name in reexports:
                    found.add(reexports[alias.name])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(package, alias.name.split(".")[1:])
    return {f for f in found if f != path}


def initializer_fingerprints(root: Path | str) -> dict[str, str]:
    """Per initializer registered under ``root/loram_ref``: a hash of the code it runs (its
    module, every ``loram_ref`` module that module imports, transitively, and the package's
    ``__init__.py``; the imports of ``__init__.py`` itself, which load every initializer, are
    not followed: another initializer's module is not this one's code). Equal hashes on two
    sides: the initializer runs the same code. Read from the source, nothing imported, so
    it works for any revision."""
    import hashlib

    package = Path(root) / PACKAGE
    init = package / "__init__.py"
    reexports = _reexports(package) if init.is_file() else {}
    out: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        names = registered_names(path)
        if not names:
            continue
        closure, todo = {path, init}, [path]
        while todo:
            for dep in _imported_files(todo.pop(), package, reexports):
                if dep not in closure:
                    closure.add(dep)
                    if dep != init:
                        todo.append(dep)
        digest = hashlib.sha1()
        for file in sorted(f for f in closure if f.is_file()):
            digest.update(str(file.relative_to(package)).encode() + b"\0" + file.read_bytes() + b"\0")
        for name in names:
            out[name] = digest.hexdigest()[:16]
    return out


#: The temporary folders of base worktrees: ``<tmp>/loram-bench-base-XXXX/tree``, with
#: ``owner.json`` (the pid and start time of the process that made it) beside ``tree``.
WORKTREE_PREFIX = "loram-bench-base-"
OWNER_FILE = "owner.json"


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (a cancelled CI job, a closed terminal): raised in the main
    thread so that every ``finally`` runs, the worktree's removal among them."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextmanager
def _signals_raise():
    """While inside: SIGTERM and SIGHUP raise :class:`Terminated` (SIGINT raises
    ``KeyboardInterrupt`` already). Only in the main thread; restored afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, _frame):
        raise Terminated(signum)

    saved = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _owner() -> dict[str, Any]:
    import os

    import psutil

    return {"pid": os.getpid(), "started": psutil.Process().create_time()}


def _owner_alive(owner: dict[str, Any]) -> bool:
    import psutil

    try:
        return abs(psutil.Process(int(owner["pid"])).create_time() - float(owner["started"])) < 1e-3
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def prune_stale_worktrees(root: Path) -> list[str]:
    """Remove the base worktrees of ``continuous`` runs that died without cleaning up (a
    SIGKILL, a power cut): ours by their folder name, stale when the process named in
    their ``owner.json`` is gone. Worktrees of other tools are never touched. Returns the
    paths removed."""
    out = _git(root, "worktree", "list", "--porcelain")
    removed = []
    for line in out.stdout.splitlines():
        if not line.startswith("worktree "):
            continue
        path = Path(line[len("worktree "):])
        parent = path.parent
        if path.name != "tree" or not parent.name.startswith(WORKTREE_PREFIX):
            continue
        try:
            owner = json.loads((parent / OWNER_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            owner = {}
        if owner and _owner_alive(owner):
            continue  # a run in progress
        _git(root, "worktree", "remove", "--force", str(path))
        shutil.rmtree(parent, ignore_errors=True)
        removed.append(str(path))
    _git(root, "worktree", "prune")  # entries whose folder is already gone
    return removed


@contextmanager
def worktree(root: Path, commit: str) -> Iterator[Path]:
    """``commit`` checked out (detached) into a temporary folder, removed afterwards, also
    when the run is interrupted (Ctrl-C), terminated or hung up on (SIGTERM, SIGHUP: they
    raise :class:`Terminated` while the worktree exists). Stale worktrees of earlier runs
    that were killed outright are pruned first (:func:`prune_stale_worktrees`)."""
    with _signals_raise():
        for path in prune_stale_worktrees(root):
            print(f"removed the stale base worktree {path} of a gate run that was killed", file=sys.stderr)
        parent = Path(tempfile.mkdtemp(prefix=WORKTREE_PREFIX))
        try:
            (parent / OWNER_FILE).write_text(json.dumps(_owner()))
            path = parent / "tree"
            out = _git(root, "worktree", "add", "--detach", "--quiet", str(path), commit)
            if out.returncode != 0:
                raise OSError(f"git worktree add {commit[:12]} failed: {out.stderr.strip()}")
            if not (path / PACKAGE).is_dir():
                raise ValueError(f"revision {commit[:12]} has no {PACKAGE}/ folder: nothing to compare")
            yield path
        finally:
            _git(root, "worktree", "remove", "--force", str(parent / "tree"))
            shutil.rmtree(parent, ignore_errors=True)
            _git(root, "worktree", "prune")


def load_tree(tree: Tree):
    """Import ``loram_ref`` from ``tree.root`` in this (worker) process, in place of any
    ``loram_ref`` already imported, and plant its slowdowns. Returns the module."""
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    root = str(Path(tree.root).resolve())
    sys.path[:] = [root, *(p for p in sys.path if p != root)]
    importlib.invalidate_caches()
    module = importlib.import_module(PACKAGE)
    where = Path(module.__file__).resolve().parent
    if where != Path(root) / PACKAGE:
        raise ImportError(f"{PACKAGE} was imported from {where}, not from the {tree.label} tree {root}")
    if tree.slow_down:
        from bench.gate.plant import plant

        plant(module.INITIALIZERS, tree.slow_down)
    return module


def run_tree_task(tree: Tree, task) -> dict[str, Any]:
    """A worker's body: the task measured with ``tree``'s initializers (``bench.initcost.worker.run_task``).
    The launcher has already given the process a memory layout of its own (``bench.core.layout``)."""
    from bench.initcost.worker import PHASE, run_task

    PHASE["now"] = "setup"
    load_tree(tree)
    return run_task(task)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.gate.trees TREE_JSON``: a spawned worker of one side (task on stdin)."""
    import functools

    from bench.initcost.tasks import Task
    from bench.initcost.worker import serve

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.gate.trees TREE_JSON  (the task as JSON on stdin)", file=sys.stderr)
        return 2
    return serve(Task.from_dict, functools.partial(run_tree_task, Tree.from_json(args[0])))


if __name__ == "__main__":
    raise SystemExit(main())
