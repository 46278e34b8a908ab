"""What a benchmark ran on, for its report: CPUs differ (bf16 matmuls are slow without AVX512-BF16 or AMX)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """E.g. ``AMD EPYC, AVX512-BF16, 2 threads``."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()}, {torch.get_num_threads()} threads"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16 instructions"
    return f"{name}, {bf16}, {torch.get_num_threads()} threads"
