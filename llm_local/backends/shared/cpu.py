"""What the CPU computes natively, read from /proc/cpuinfo (backend-neutral)."""

from __future__ import annotations

from pathlib import Path

# CPU features with which bfloat16 matrix products run natively: x86's AVX512-BF16 and
# AMX-BF16, Arm's BF16 extension. Without them bfloat16 is converted to float32 on the
# way (PyTorch's oneDNN, llama.cpp's ggml alike) and cannot gain.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (x86 "flags", Arm "Features"); empty if unreadable."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first CPU's model name ("" if unreadable)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "CPU part"):
            return value.strip()
    return ""
