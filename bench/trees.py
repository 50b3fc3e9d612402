"""Source trees a worker takes ``loram_ref`` from: the working tree, or a git revision
checked out into a temporary worktree (``git worktree add --detach``).

The harness (``bench``) is always the running one: only the initializers change sides,
so two revisions are measured by the same measuring code. A forked worker drops the
fork server's ``loram_ref``, puts its tree first on ``sys.path`` and imports it afresh
(both sides do, so both pay the same import in their set-up phase, never in a timed
region); a spawned worker (CUDA) runs ``python -m bench.trees TREE_JSON``.
"""

from __future__ import annotations

import hashlib
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
    root = Path(__file__).resolve().parent.parent
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
    digest = hashlib.sha1()
    package = Path(root) / PACKAGE
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@contextmanager
def worktree(root: Path, commit: str) -> Iterator[Path]:
    """``commit`` checked out (detached) into a temporary folder, removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="loram-bench-base-"))
    path = parent / "tree"
    out = _git(root, "worktree", "add", "--detach", "--quiet", str(path), commit)
    if out.returncode != 0:
        shutil.rmtree(parent, ignore_errors=True)
        raise OSError(f"git worktree add {commit[:12]} failed: {out.stderr.strip()}")
    try:
        if not (path / PACKAGE).is_dir():
            raise ValueError(f"revision {commit[:12]} has no {PACKAGE}/ folder: nothing to compare")
        yield path
    finally:
        _git(root, "worktree", "remove", "--force", str(path))
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
        from .plant import plant

        plant(module.INITIALIZERS, tree.slow_down)
    return module


#: What :func:`shuffle_layout` allocated: kept alive for the worker's life.
_LAYOUT: list[Any] = []


def shuffle_layout() -> None:
    """Give this process a memory layout of its own (Stabilizer's idea: Curtsinger & Berger,
    ASPLOS 2013). A forked worker inherits the fork server's address space, and the steps a
    side's workers take before measuring are the same every time, so without this every
    worker of one side would get the same heap and mmap addresses: measured here, the small
    noise-init cells then ran in one speed mode (150 µs) on one side and another (300 µs)
    on the other for a whole run, a 2x "regression" between two identical trees. A few
    random-sized heap blocks and one random-sized anonymous mapping shift every later
    allocation, so the mode is drawn per process and falls on both sides alike."""
    import mmap
    import os
    import random

    rng = random.Random(os.urandom(16))  # forked children share the parent's random state
    _LAYOUT.extend(bytearray(rng.randrange(1 << 10, 1 << 16)) for _ in range(rng.randrange(1, 9)))
    _LAYOUT.append(mmap.mmap(-1, rng.randrange(1, 1 << 10) * mmap.PAGESIZE))


def run_tree_task(tree: Tree, task) -> dict[str, Any]:
    """A worker's body: the task measured with ``tree``'s initializers (``bench.worker.run_task``),
    in a memory layout of its own (:func:`shuffle_layout`, before and after the import)."""
    from .worker import PHASE, run_task

    PHASE["now"] = "setup"
    shuffle_layout()
    load_tree(tree)
    shuffle_layout()
    return run_task(task)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.trees TREE_JSON``: a spawned worker of one side (task on stdin)."""
    import functools

    from .tasks import Task
    from .worker import serve

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.trees TREE_JSON  (the task as JSON on stdin)", file=sys.stderr)
        return 2
    return serve(Task.from_dict, functools.partial(run_tree_task, Tree.from_json(args[0])))


if __name__ == "__main__":
    raise SystemExit(main())
