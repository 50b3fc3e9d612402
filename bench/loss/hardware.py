"""What the processor computes natively, read once per run (torch imported when asked)."""

from __future__ import annotations


def bf16_supported(device: str) -> bool:
    """Whether ``device`` computes in bf16 natively (CPU: AVX512-BF16 or AMX, via oneDNN)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
