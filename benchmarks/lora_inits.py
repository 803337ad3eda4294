"""LoRA initialisations at equal rank (r 8 on query/value): default (Kaiming A, zero B), gaussian, PiSSA, OLoRA,
EVA (and CorDA where the attrs package is installed) on sst2 and financial_phrasebank, same small CPU budget.

    PYTHONPATH=. HF_HUB_OFFLINE=1 PEFTKIT_DATA=../shared/data python benchmarks/lora_inits.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import COMMON, add_budget_args, fmt, out_flag, run_cell, task_overrides, write_results

INITS = ["default", "gaussian", "pissa", "olora", "eva"]  # corda: refused, see the md


def main() -> None:
    parser = argparse.ArgumentParser()
    add_budget_args(parser)
    parser.add_argument("--inits", default=",".join(INITS))
    args = parser.parse_args()
    inits = args.inits.split(",")
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            base = None
            for init in inits:
                method = {
                    "name": "lora",
                    "r": 8,
                    "alpha": 16,
                    "dropout": 0.1,
                    "target_modules": ["query", "value"],
                    "init": init,
                }
                overrides = [
                    *task_overrides(task, args.rows, args.eval_rows),
                    *COMMON,
                    "train.lr=2e-3",
                    "train.head_lr=3e-3",
                ]
                s = run_cell(method, overrides, Path(tmp) / f"{task}-{init}")
                raw.append({"task": task, "init": init, "method": method, "overrides": overrides, **s})
                if "error" in s:
                    rows.append([task, init, "error: " + s["error"][:150], "-", "-", "-", "-"])
                    continue
                base = s if init == inits[0] else base  # the deltas are against the first init listed
                acc = s["best"]["accuracy"]
                rows.append(
                    [
                        task,
                        init,
                        fmt(100 * acc),
                        fmt(base and 100 * (acc - base["best"]["accuracy"]), "+.1f"),
                        fmt(s["best"]["loss"], ".3f"),
                        s["trainable_params"],
                        fmt(s["train_seconds"], ".0f"),
                    ]
                )
                print(rows[-1], flush=True)
    env = next((c["environment"] for c in raw if c.get("environment")), {})
    write_results(
        args.out,
        "lora_inits",
        f"PYTHONPATH=. HF_HUB_OFFLINE=1 PEFTKIT_DATA=../shared/data python benchmarks/lora_inits.py "
        f"--tasks {args.tasks} --rows {args.rows} --eval-rows {args.eval_rows} --inits {args.inits}"
        f"{out_flag(args.out)}",
        "LoRA initialisations at equal rank on MiniLM (CPU)",
        ["task", "init", "val acc %", f"Δ vs {inits[0]}", "val loss", "trainable", "train s"],
        rows,
        raw,
        [
            (
                f"MiniLM-L6, LoRA r 8 alpha 16 on query/value, lr 2e-3 (head 3e-3), one pass over {args.rows} "
                f"train rows (batch 16), <= {args.eval_rows} validation rows, seed 0, one run per cell: a tiny "
                "budget, so differences "
                "of a few points are within seed noise."
            ),
            (
                f"Machine: {env.get('cpu')}, shared with other jobs (train seconds are not comparable across rows); "
                f"torch {env.get('torch')}, peft {env.get('peft')}."
            ),
            (
                "eva reads the first 8 training batches at apply time; pissa/olora change the base and are saved "
                "converted to a rank-16 plain LoRA against the original base."
            ),
        ],
    )


if __name__ == "__main__":
    main()
