"""The nine first-class peft tuners added with issue 12 (plus LoRA as the reference) at a small CPU budget on sst2 and
financial_phrasebank: validation accuracy, trainable %, peak memory, time. Each method runs with its recipe's
options and learning rates (recipes/methods/<method>.yaml).

    PYTHONPATH=. HF_HUB_OFFLINE=1 PEFTKIT_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/tuners.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml
from _common import COMMON, add_budget_args, fmt, out_flag, run_cell, task_overrides, write_results

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "methods"
METHODS = ["lora", "vera", "loha", "lokr", "oft", "boft", "hra", "fourierft", "ln_tuning", "miss"]
LORA = (
    {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "value"]},
    {"lr": 2e-3, "head_lr": 3e-3},
)  # the cpu bench profile's short-budget LoRA setting


def recipe(method: str) -> tuple[dict, dict]:
    if method == "lora":
        return LORA
    data = yaml.safe_load((RECIPES / f"{method}.yaml").read_text())
    return data["method"], data.get("train", {})


def main() -> None:
    parser = argparse.ArgumentParser()
    add_budget_args(parser)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--name", default="tuners")
    args = parser.parse_args()
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            for name in args.methods.split(","):
                method, train = recipe(name)
                overrides = [
                    *task_overrides(task, args.rows, args.eval_rows),
                    *COMMON,
                    *(f"train.{k}={v}" for k, v in train.items()),
                ]
                s = run_cell(method, overrides, Path(tmp) / f"{task}-{name}")
                raw.append({"task": task, "method": method, "overrides": overrides, **s})
                if "error" in s:
                    rows.append([task, name, "error: " + s["error"][:150], *["-"] * 6])
                else:
                    rows.append(
                        [
                            task,
                            name,
                            fmt(100 * s["best"]["accuracy"]),
                            fmt(s["trainable_pct"], ".3f"),
                            s["trainable_params"],
                            fmt(s["peak_memory_mb"], ".0f"),
                            fmt(s["train_seconds"], ".0f"),
                            fmt(s["train_examples_per_s"]),
                            f"{train.get('lr')}",
                        ]
                    )
                print(rows[-1], flush=True)
    env = next((c["environment"] for c in raw if c.get("environment")), {})
    write_results(
        args.out,
        args.name,
        f"PYTHONPATH=. HF_HUB_OFFLINE=1 PEFTKIT_DATA=../shared/data OMP_NUM_THREADS=1 python "
        f"benchmarks/tuners.py --tasks {args.tasks} --rows {args.rows} --eval-rows {args.eval_rows} "
        f"--methods {args.methods} --name {args.name}{out_flag(args.out)}",
        "New peft tuners on MiniLM at a small CPU budget",
        ["task", "method", "val acc %", "trainable %", "trainable", "peak RSS MB", "train s", "ex/s", "lr"],
        rows,
        raw,
        [
            (
                f"MiniLM-L6, one pass over {args.rows} train rows (batch 16), <= {args.eval_rows} validation rows, "
                "fp32, "
                "seed 0, one run per cell, each method with its recipe's options and lr (head lr 2e-3; LoRA: the cpu "
                "profile's 2e-3/3e-3). A tiny budget: accuracies are far from converged and rank little."
            ),
            (
                f"Machine: {env.get('cpu')}, {env.get('torch_threads')} torch thread(s), shared with other jobs, so "
                f"speeds are noisy; torch {env.get('torch')}, peft {env.get('peft')}."
            ),
        ],
    )


if __name__ == "__main__":
    main()
