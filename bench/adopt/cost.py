"""What adopting each initializer costs on a real model: ``loram_ref.peft.initialize`` next to
PEFT's ``get_peft_model`` for the methods PEFT has, each in a fresh process.

Every (method, mode) is one ``python -m bench.adopt.worker`` child (``bench.core.children``'s
environment: it never imports from the working folder), killed at ``limit_s``; its row is
appended to ``adopt.jsonl`` as it finishes, so a crash or a timeout costs only its own row
(``status`` and ``reason`` say which). A PEFT path that cannot run here (its LoftQ needs
bitsandbytes on CUDA/XPU) is recorded as ``not_run`` with PEFT's reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.core.children import child_env
from bench.core.results import append_row, timestamp

RESULTS_FILE = "adopt.jsonl"


@dataclass(frozen=True)
class CostPlan:
    """One adoption-cost run: the model folder, what to measure and how."""

    model: str
    methods: tuple[str, ...]
    rank: int
    alpha: float
    targets: tuple[str, ...]
    data: str | None  # a .pt file of token ids (samples x tokens)
    batch_size: int = 8
    lr: float = 1e-4
    dtype: str = "float32"
    threads: int = 0
    peft: bool = True
    plain: bool = True
    limit_s: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import loram_ref

        for method in self.methods:
            loram_ref.get_initializer(method)
        if self.rank < 1 or self.batch_size < 1:
            raise ValueError(f"rank and batch_size must be >= 1, got {self.rank} and {self.batch_size}")
        if not self.limit_s > 0:
            raise ValueError(f"limit_s must be > 0, got {self.limit_s}")

    def specs(self) -> list[dict[str, Any]]:
        import loram_ref

        out = []
        for method in self.methods:
            common = {"method": method, "model": self.model, "rank": self.rank, "alpha": self.alpha,
                      "targets": list(self.targets), "data": self.data, "batch_size": self.batch_size, "lr": self.lr,
                      "dtype": self.dtype, "threads": self.threads, **self.extra}
            out.append({**common, "mode": "ours", "plain": self.plain})
            if self.peft and loram_ref.get_initializer(method).peft_init is not None:
                out.append({**common, "mode": "peft"})
        return out


def _run(spec: dict[str, Any], limit_s: float) -> dict[str, Any]:
    base = {"kind": "adopt_cost", "method": spec["method"], "mode": spec["mode"], "model": spec["model"],
            "rank": spec["rank"]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.adopt.worker", fh.name], env=child_env(),
                              cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "reason": f"ran past {limit_s:g} s"}
    finally:
        Path(fh.name).unlink(missing_ok=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {**base, "status": "failed", "reason": tail[0][:500]}
    return json.loads(lines[-1])


def run_cost(plan: CostPlan, out: Path, say: Callable[[str], None] = lambda text: None) -> list[dict[str, Any]]:
    """Measure every (method, mode) of ``plan``; rows appended to ``out/adopt.jsonl`` one by one."""
    rows = []
    specs = plan.specs()
    for index, spec in enumerate(specs):
        row = {**_run(spec, plan.limit_s), "timestamp": timestamp()}
        append_row(out / RESULTS_FILE, row)
        rows.append(row)
        what = (f"{row['seconds']:.2f} s, peak +{row['peak_cpu_extra_bytes'] / 2**20:.0f} MiB"
                if row.get("status") == "ok" else f"{row['status']}: {row.get('reason', '')}")
        say(f"[{index + 1}/{len(specs)}] {spec['method']} ({spec['mode']}): {what}")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Ours next to PEFT's per method, as text."""
    by = {(r["method"], r["mode"]): r for r in rows}
    lines = [f"{'initializer':<13} {'ours s':>8} {'stats s':>8} {'peak MiB':>9} {'PEFT s':>8} {'PEFT MiB':>9} "
             f"{'invariant':>10} {'plain r':>7} {'plain MB':>8} {'logits Δ':>9}"]
    for method in dict.fromkeys(r["method"] for r in rows):
        ours, theirs = by.get((method, "ours"), {}), by.get((method, "peft"), {})

        def fmt(row, key, scale=1.0, spec=".2f"):
            if row.get("status") == "ok":
                return format(row[key] / scale, spec) if isinstance(row.get(key), (int, float)) else "-"
            return row.get("status", "-") if row else "-"

        lines.append(f"{method:<13} {fmt(ours, 'seconds'):>8} {fmt(ours, 'stats_seconds'):>8} "
                     f"{fmt(ours, 'peak_cpu_extra_bytes', 2**20, '.0f'):>9} {fmt(theirs, 'seconds'):>8} "
                     f"{fmt(theirs, 'peak_cpu_extra_bytes', 2**20, '.0f'):>9} "
                     f"{fmt(ours, 'max_invariant_error', 1.0, '.1e'):>10} {fmt(ours, 'plain_rank', 1.0, '.0f'):>7} "
                     f"{fmt(ours, 'plain_bytes', 1e6, '.1f'):>8} {fmt(ours, 'plain_logits_max_abs_diff', 1.0, '.1e'):>9}")
    return "\n".join(lines)
