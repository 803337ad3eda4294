"""LoRA on MiniLM with an fp32, bf16-autocast, 8-bit (LLM.int8) and 4-bit (NF4) base on CPU: peak memory, training
speed and validation accuracy on sst2 and financial_phrasebank, with ratios against fp32.

    PYTHONPATH=. HF_HUB_OFFLINE=1 PEFTKIT_DATA=../shared/data python benchmarks/quantization.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import COMMON, add_budget_args, fmt, out_flag, run_cell, task_overrides, write_results

VARIANTS = {
    "fp32": [],
    "bf16": ["train.bf16=true"],
    "8bit": ["model.quantization=8bit"],
    "4bit": ["model.quantization=4bit"],
}
LORA = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "value"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    add_budget_args(parser)
    args = parser.parse_args()
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            base = None
            for variant, extra in VARIANTS.items():
                overrides = [
                    *task_overrides(task, args.rows, args.eval_rows),
                    *COMMON,
                    "train.lr=2e-3",
                    "train.head_lr=3e-3",
                    *extra,
                ]
                s = run_cell(LORA, overrides, Path(tmp) / f"{task}-{variant}")
                raw.append({"task": task, "variant": variant, "overrides": overrides, **s})
                if "error" in s:
                    rows.append([task, variant, "error: " + s["error"][:120], *["-"] * 7])
                    continue
                base = s if variant == "fp32" else base  # the ratios are against fp32, or "-" when it failed
                acc = s["best"]["accuracy"]
                rows.append(
                    [
                        task,
                        variant,
                        fmt(100 * acc),
                        fmt(base and 100 * (acc - base["best"]["accuracy"]), "+.1f"),
                        fmt(s["peak_memory_mb"], ".0f"),
                        fmt(base and s["peak_memory_mb"] / base["peak_memory_mb"], ".2f"),
                        fmt(s["model_state_mb"]),
                        fmt(s["train_examples_per_s"]),
                        fmt(base and s["train_examples_per_s"] / base["train_examples_per_s"], ".2f"),
                        fmt(s["train_seconds"], ".0f"),
                    ]
                )
                print(rows[-1], flush=True)
    env = next((c["environment"] for c in raw if c.get("environment")), {})
    write_results(
        args.out,
        "quantization",
        f"PYTHONPATH=. HF_HUB_OFFLINE=1 PEFTKIT_DATA=../shared/data python benchmarks/quantization.py "
        f"--tasks {args.tasks} --rows {args.rows} --eval-rows {args.eval_rows}"
        f"{out_flag(args.out)}",
        "LoRA on a quantized MiniLM base on CPU: memory, speed, accuracy",
        [
            "task",
            "base",
            "val acc %",
            "Δ acc vs fp32",
            "peak RSS MB",
            "× fp32",
            "model state MB",
            "train ex/s",
            "× fp32",
            "train s",
        ],
        rows,
        raw,
        [
            (
                f"MiniLM-L6 (22.7M), LoRA r 8 on query/value, lr 2e-3 (head 3e-3), one pass over {args.rows} "
                f"train rows (batch 16), <= {args.eval_rows} validation rows, seed 0, one run per cell: a tiny "
                "budget, so accuracies "
                "are far below converged values and differences of a few points are noise."
            ),
            (
                f"Machine: {env.get('cpu')}, {env.get('torch_threads')} torch threads, torch {env.get('torch')}, "
                f"bitsandbytes CPU kernels; the machine is SHARED with other jobs, so speeds are noisy (± tens of %)."
            ),
            (
                "peak RSS = the training process's peak resident memory (weights, activations, optimizer, Python); "
                "model state = weight tensors + gradient and two AdamW moments of the trainable ones."
            ),
            (
                "bf16 = bf16 autocast (train.bf16=true), the frozen linear weights held in bf16 by the loop "
                "(precision.hold_frozen_linears_in_bf16); the other rows train.bf16=false. 4bit = NF4 with double "
                "quantisation, float32 compute on CPU; head (classifier) and pooler stay fp32 in the quantized runs."
            ),
            (
                "The word embeddings (11.7M of the 22.7M parameters) are not quantized by bitsandbytes/transformers "
                "(only nn.Linear layers are)."
            ),
        ],
    )


if __name__ == "__main__":
    main()
