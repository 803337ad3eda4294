"""Measurements every run and benchmark records: peak memory, model-state size, and the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.local_paths import absolute_data_dir


class MemoryMeter:
    """Peak memory of the training phase: CUDA's max_memory_allocated, or on CPU the process's peak RSS
    (reset through /proc/self/clear_refs, so it covers this run only) above the RSS at the start."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.baseline = _proc_status_kb("VmRSS") * 1024

    def peak(self) -> dict[str, float]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_kb("VmHWM") * 1024
        mb = 1024 * 1024
        return {
            "peak_memory_mb": round(peak / mb, 1),
            "baseline_memory_mb": round(self.baseline / mb, 1),
            "peak_memory_above_baseline_mb": round(max(peak - self.baseline, 0) / mb, 1),
            "memory_kind": "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss",
        }


def _proc_status_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def model_state_mb(model: nn.Module) -> float:
    """Tensor memory of model state: weights, plus gradient and two AdamW moments per trainable parameter."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size() * (4 if p.requires_grad else 1)
    return round(total / (1024 * 1024), 1)


BUSY_CORES = 0.25  # a run timed while other processes used this many cores on average was timed on a busy machine


class LoadMeter:
    """How many cores other processes kept busy while this one ran, from /proc/stat and this process's CPU time.

    A timing taken on a shared machine is a speed claim only when this is near zero; the bench records it per cell
    so that its tables can say which times were measured while the machine was busy. None off Linux.
    """

    def __init__(self) -> None:
        self.started, self.system, self.own = time.perf_counter(), _system_busy_seconds(), time.process_time()

    def other_cores(self) -> float | None:
        system = _system_busy_seconds()
        if system is None or self.system is None:
            return None
        wall = max(time.perf_counter() - self.started, 1e-9)
        others = (system - self.system) - (time.process_time() - self.own)
        return round(max(others, 0.0) / wall, 2)


def _system_busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (every state of /proc/stat's first line but idle and iowait)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    import peft
    import transformers

    from peftkit import __version__

    return {
        "peftkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_manifest() -> dict[str, Any]:
    """What the per-run `environment` lacks: the exact CPU model, core count, git commit, data folder, command."""
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "peftkit_data": absolute_data_dir(),  # absolute: a relative one names no folder once read elsewhere
    }


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None
