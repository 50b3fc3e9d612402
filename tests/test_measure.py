"""Peak-memory measurement sees a known allocation inside the region, not one outside."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from bench.core.measure import reset_peak_rss

MiB = 1 << 20

_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from bench.core.measure import cpu_peak
    outside = torch.ones(256 * 2**20 // 4)          # 256 MiB before the region
    with cpu_peak() as peak:
        inside = torch.ones(128 * 2**20 // 4)       # 128 MiB inside it
        del inside
    print(json.dumps({"extra": peak.extra_bytes, "method": peak.method}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_cpu_peak_sees_inside_not_outside():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True,
                         env={"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": ""})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["method"] == "vmhwm-reset" and reset_peak_rss()
    assert abs(result["extra"] - 128 * MiB) < 0.10 * 128 * MiB


def test_loram_extra_memory_is_tiny_for_bf16(tmp_path):
    """Issue #2's memory discipline, measured: LoRAM on a bf16 W makes no fp32 copy of W."""
    from bench.initcost.runner import Runner
    from bench.initcost.tasks import Task

    task = Task("loram_dst", 2048, 4096, 16, dtype="bfloat16", values=1)
    (row,) = Runner(tmp_path / "r.jsonl", progress=False).run([task])
    weight = 2048 * 4096 * 2
    fp32_copy = 2 * weight
    assert row["status"] == "ok"
    assert row["peak_cpu_extra_bytes"] < 0.25 * fp32_copy  # an fp32 copy would be 32 MiB; blocks are <= 4 MiB


def test_gpu_peak_is_zero_on_cpu():
    import torch

    from bench.core.measure import gpu_peak

    with gpu_peak(torch.device("cpu")) as peak:
        torch.ones(1000)
    assert peak.allocated_bytes == 0 and peak.reserved_bytes == 0
