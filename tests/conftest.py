"""Shared helpers: every initializer called with the statistics it needs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loram_ref

#: The loss benchmark's test text: enough blocks of 16-32 tokens for a tiny model.
TEXT = " ".join(f"line {i}: the quick brown fox {i % 7} jumps over {i % 11} lazy dogs." for i in range(400))


@pytest.fixture()
def corpus_file(tmp_path):
    """:data:`TEXT` as a local ``--data`` file."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path

SHAPES = {"tall": (96, 48), "wide": (40, 112), "square": (64, 64)}
DTYPES = [torch.float32, torch.bfloat16]

# Relative Frobenius tolerance of a reconstruction W_res + s·B·A ≈ W: about ten roundings
# of the dtype (the residual and factors are each rounded once in W's dtype).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


class OneLinear(nn.Module):
    """A model of one bias-free linear layer ``lin`` holding ``weight``: what PEFT wraps in the
    agreement tests (``target_modules=["lin"]``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            self.lin.weight.copy_(weight)

    def forward(self, x):
        return self.lin(x)


def stats_for(name: str, m: int, n: int, seed: int = 123):
    kind = loram_ref.get_initializer(name).statistics
    return {"stats": kind.synthetic(m, n, torch.Generator().manual_seed(seed))} if kind.needed else {}


def run_init(name: str, weight: torch.Tensor, rank: int, scaling: float = 1.0, **kwargs) -> loram_ref.LoraInit:
    m, n = weight.shape
    return loram_ref.initialize(name, weight, rank, scaling, **stats_for(name, m, n), **kwargs)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def orthonormality_error(cols: torch.Tensor) -> float:
    """max |CᵀC - I| for a matrix with (supposedly) orthonormal columns."""
    c = cols.double()
    return float((c.mT @ c - torch.eye(c.shape[1], dtype=torch.float64)).abs().max())


#: What importing a planted module does: leave a marker (in the folder the running command
#: names in LORAM_TEST_MARKS) and fail.
_PLANTED_SOURCE = (
    "import os\n"
    "open(os.path.join(os.environ.get('LORAM_TEST_MARKS', '.'), __name__ + '-' + str(os.getpid())), 'w').close()\n"
    "raise ImportError('planted module imported from the working folder')\n")
#: Modules named like what the harness and its children import.
PLANTED = ("json", "pickle", "torch", "numpy", "loram_ref", "bench")
#: The real commands run from the planted folder, each a child-process path: the fork server and
#: its workers plus the calibration (run), layer workers (layer-loss), torchrun and its ranks
#: (sharded), the base tree's workers (continuous). The first three write one results folder.
PLANTED_COMMANDS = {
    "run": ["run", "--shape", "32x32", "--initializers", "noise_zeros", "loram_dst", "--values", "1", "--processes", "1",
            "--out", "results"],
    "layer-loss": ["layer-loss", "--shapes", "96x96", "--initializers", "noise_zeros", "loram_dst", "--seeds", "0", "1",
                   "--steps", "2", "--out", "results"],
    "sharded": ["sharded", "--world-size", "1", "--shape", "32x32", "--initializers", "noise_zeros", "loram_dst",
                "--repeats", "1", "--out", "results"],
    "continuous": ["continuous", "HEAD", "--shape", "32x32", "--initializers", "noise_zeros", "--screen-rounds", "2",
                   "--gate-unchanged", "--out", "results-gate"],
}


@pytest.fixture(scope="session")
def planted_runs(tmp_path_factory):
    """Every command of :data:`PLANTED_COMMANDS` run, as a user would, from a working folder
    full of planted modules (:data:`PLANTED`). Returns the folder, each command's finished
    process and the markers its children left (none, unless one imported from the folder)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("planted")
    folder = root / "work"
    folder.mkdir()
    for name in PLANTED:
        (folder / f"{name}.py").write_text(_PLANTED_SOURCE)
    script = Path(sys.executable).with_name("loram-bench")
    runs, marks = {}, {}
    for command, args in PLANTED_COMMANDS.items():
        mark_dir = root / f"marks-{command}"
        mark_dir.mkdir()
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "LORAM_TEST_MARKS": str(mark_dir)}
        runs[command] = subprocess.run([str(script), *args, "--no-progress"], cwd=folder, capture_output=True,
                                       text=True, timeout=600, env=env)
        marks[command] = sorted(p.name for p in mark_dir.iterdir())
    return SimpleNamespace(folder=folder, runs=runs, marks=marks)
