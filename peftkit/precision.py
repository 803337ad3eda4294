"""Where bf16 autocast pays: CPUs with AMX or AVX512-BF16, and bf16-capable GPUs. fp32 everywhere else."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch


@functools.cache
def cpu_has_bf16() -> bool:
    """True on a CPU with native bf16 matmuls (AMX tiles or AVX512-BF16); emulated bf16 is slower than fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    cpu = getattr(torch._C, "_cpu", None)
    for name in probes:
        probe = getattr(cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except Exception:  # noqa: BLE001 - a private probe; fall back to /proc/cpuinfo
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def bf16_pays(device: torch.device) -> bool:
    """Whether bf16 autocast is the faster choice on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def resolve_bf16(setting: bool | None, device: torch.device) -> bool:
    """`train.bf16`: true or false as given; null (the default) = on where it pays (`bf16_pays`)."""
    return bf16_pays(device) if setting is None else bool(setting)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast when asked (CPU with AVX512-BF16, or CUDA), otherwise a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
