"""The measurement parts of benchmarks/speed.py beside the training runs: this machine's matmul peak, the FLOPs
of one LoRA training step (for the roofline fraction), and `peftkit predict` wall time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

LORA = {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "value"]}


# --------------------------------------------------------------------------------------------- roofline


def matmul_peak(dtype_name: str, n: int = 1536, repeats: int = 12) -> float:
    """Best FLOP/s of an n x n matmul on this machine's torch threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def lora_step_flops_per_token(mean_length: float) -> dict:
    """FLOPs per real token of one LoRA training step of MiniLM-L6 (r=8 on query/value): the forward's matmuls
    (the six layers' linear layers, attention scores and context over `mean_length` tokens) plus the backward's
    input gradients through the frozen weights (as much again), plus LoRA's own small weight gradients."""
    from peftkit.config import ModelConfig
    from peftkit.modeling import load_model

    model = load_model(ModelConfig(), 2, 0)
    hidden = model.config.hidden_size
    linear = sum(
        2 * m.in_features * m.out_features
        for name, m in model.named_modules()
        if type(m).__name__ == "Linear" and ".encoder." in f".{name}"
    )
    attention = model.config.num_hidden_layers * 2 * 2 * mean_length * hidden
    lora_layers = 2 * model.config.num_hidden_layers
    lora = lora_layers * 2 * 2 * LORA["r"] * hidden  # A and B, forward
    forward = linear + attention + lora
    return {"forward": forward, "step": 2 * forward + 2 * lora, "linear": linear, "attention": attention}


# --------------------------------------------------------------------------------------------- predict timing


def time_predict(adapter: Path, work: Path, repeats: int) -> dict:
    rows = [json.loads(line) for line in (Path(os.environ["PEFTKIT_DATA"]) / "sst2" / "validation.jsonl").open()]
    source = work / "sst2-validation-x8.jsonl"
    source.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows * 8))
    out: dict = {"rows": len(rows) * 8, "default": [], "no_bf16": []}
    for _ in range(repeats):
        for key, flags in (("default", []), ("no_bf16", ["--no-bf16"]))[: 1 if not bf16_pays_here() else 2]:
            started = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "peftkit",
                    "predict",
                    str(adapter),
                    "--input",
                    str(source),
                    "--output",
                    str(work / "out.jsonl"),
                    *flags,
                ],
                check=True,
                capture_output=True,
            )
            out[key].append(round(time.perf_counter() - started, 2))
    return out


def bf16_pays_here() -> bool:
    import torch

    from peftkit.precision import bf16_pays

    return bf16_pays(torch.device("cpu"))
