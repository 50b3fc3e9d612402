"""The environment recorded with every result row: versions, commit, hardware, threads."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("torch", "transformers", "peft", "numpy", "pandas", "scipy", "plotly")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def package_fingerprint(root: Path | str, package: str = "loram_ref") -> str:
    """A hash of every ``.py`` file under ``root/package`` (relative path and bytes): equal
    fingerprints mean the same initializer code."""
    import hashlib

    digest = hashlib.sha1()
    folder = Path(root) / package
    for path in sorted(folder.rglob("*.py")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def loram_ref_fingerprint() -> str:
    """The fingerprint of the ``loram_ref`` this process imported (a gate worker's is its tree's)."""
    import loram_ref

    return package_fingerprint(Path(loram_ref.__file__).resolve().parent.parent)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> dict[str, Any]:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return {
                "gpu_name": props.name,
                "gpu_memory_bytes": props.total_memory,
                "cuda_version": torch.version.cuda or "",
            }
    except Exception:  # noqa: BLE001 - a broken driver must not stop a CPU run
        pass
    return {"gpu_name": "", "gpu_memory_bytes": 0, "cuda_version": ""}


@lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """One flat dict, merged into every row so each row stands on its own."""
    import psutil

    commit = _git("rev-parse", "HEAD")
    env = {
        "git_commit": commit,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else False,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "memory_bytes": psutil.virtual_memory().total,
        **{f"{p}_version": _version(p) for p in _PACKAGES},
        **_gpu(),
    }
    return env


def worker_environment(cpu_peak_method: str = "") -> dict[str, Any]:
    """What a worker process records about itself; runs of one cell must agree on it.

    ``loram_ref_path`` says which tree the initializers were imported from (two
    checkouts measured side by side differ there).
    """
    import torch

    import loram_ref

    return {
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
        "loram_ref_path": str(Path(loram_ref.__file__).resolve().parent),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "cpu_peak_method": cpu_peak_method,
    }


def machine_id(env: dict[str, Any]) -> str:
    """A short label for 'the same machine' when comparing histories."""
    gpu = env.get("gpu_name") or "cpu"
    return f"{env.get('hostname', '?')}|{env.get('cpu_model', '?')}|{env.get('cpu_count', '?')}c|{gpu}"
