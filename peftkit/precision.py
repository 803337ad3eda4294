"""Where bf16 autocast pays: CPUs with AMX or AVX512-BF16, and bf16-capable GPUs. fp32 everywhere else."""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


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


def precision_name(bf16: bool) -> str:
    """How a resolved precision is shown to users (serve's start-up line and /healthz)."""
    return "bf16" if bf16 else "fp32"


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast when asked (CPU with AVX512-BF16, or CUDA), otherwise a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def hold_frozen_linears_in_bf16(model: nn.Module) -> Callable[[], None]:
    """Store each frozen `nn.Linear` weight as bf16 for a bf16-autocast run; returns the call that restores fp32.

    Why: autocast keeps its casts only for leaf tensors that require grad, so a frozen weight is cast to bf16 again
    in every forward pass: for LoRA on MiniLM, 10.6M weights a step and 40% of the step's copy time. The values are
    the ones autocast would have made (the same round-to-nearest cast), so the numbers do not change. Only for
    methods whose frozen linear weights enter nothing but the layer's own product (`Method.frozen_linears_in_bf16`);
    a weight shared with another module (tied embeddings) stays as it is. Costs 2 bytes per held weight (the fp32
    originals are kept, so the model leaves training exactly as it came); the loop uses it on the CPU.
    """
    uses = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    originals: dict[nn.Linear, torch.Tensor] = {}
    for module in model.modules():
        weight = module.weight if type(module) is nn.Linear else None
        if weight is None or weight.requires_grad or weight.dtype != torch.float32 or uses[id(weight)] > 1:
            continue
        originals[module] = weight.data
        weight.data = weight.data.to(torch.bfloat16)

    def restore() -> None:
        for module, data in originals.items():
            module.weight.data = data

    return restore
