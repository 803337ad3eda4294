"""Which pooling should `model.pooling: auto` pick? LoRA and full fine-tuning with each pooling, one epoch each.

    python benchmarks/pooling.py [--out benchmarks/results] [--runs /tmp/pooling-runs] [--only banking77-lora,...]

Every cell is `python -m peftkit train <recipe> <overrides> model.pooling=<p>` (the exact commands are written
into the results), evaluated once at the end on at most 1000 validation rows. Results are written after every
cell, so a partial run leaves a partial table, and a later run adds its cells to the saved ones.
Order: LoRA pooler vs mean (what `auto` decides), LoRA cls/last,
the head probe (pooler, mean), then full fine-tuning with each pooling.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from peftkit.io import atomic_write_text

# one pass, no dev split: the budget this table was measured with (sst2 recipes now carry the converged bench's
# dev split and early stopping, which these overrides switch off)
COMMON = (
    "train.epochs=1 train.batch_size=16 train.eval_every=100000 train.progress=false task.max_eval_examples=1000"
    " task.dev_size=null train.patience=null train.max_epochs=null"
)
LR = {
    "lora": "train.lr=2e-3 train.head_lr=2e-3",
    "full": "train.lr=5e-5 train.head_lr=2e-3",
    "head": "train.lr=2e-3 train.head_lr=2e-3",
}
TASK = {"banking77": "", "sst2": "task.max_train_examples=8000"}
POOLINGS = ("pooler", "cls", "mean", "last")
# the most informative cells first (the default's choice: trained pooler vs the sentence-transformers mean), then
# the other poolings, the head probe, and full fine-tuning
CELLS = [(t, "lora", p) for p in ("pooler", "mean") for t in ("banking77", "sst2")]
CELLS += [(t, "lora", p) for p in ("cls", "last") for t in ("banking77", "sst2")]
CELLS += [(t, "head", p) for t in ("banking77", "sst2") for p in ("pooler", "mean")]
CELLS += [(t, "full", p) for t in ("banking77", "sst2") for p in POOLINGS]


def command(task: str, method: str, pooling: str, runs: Path) -> str:
    name = f"{task}-{method}-{pooling}"
    return (
        f"python -m peftkit train {task}-{method} {COMMON} {LR[method]} {TASK[task]} model.pooling={pooling} "
        f"train.output_dir={runs} train.run_name={name}"
    ).replace("  ", " ")


def table(rows: list[dict]) -> str:
    lines = [
        "| task | method | pooling | validation accuracy | train s | trainable params |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        acc = f"{100 * r['accuracy']:.1f}%" if r.get("accuracy") is not None else r.get("error", "failed")
        lines.append(
            f"| {r['task']} | {r['method']} | {r['pooling']} | {acc} | {r.get('train_seconds', '')} | "
            f"{r.get('trainable_params', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--runs", default="/tmp/peftkit-pooling-runs")
    parser.add_argument("--only", default="", help="comma-separated task-method[-pooling] prefixes")
    args = parser.parse_args()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [w for w in args.only.split(",") if w]
    names = [f"{task}-{method}-{pooling}" for task, method, pooling in CELLS]
    if unmatched := [w for w in wanted if not any(n.startswith(w) for n in names)]:
        parser.error(f"--only {', '.join(unmatched)} matches no cell; cells: {', '.join(names)}")
    # earlier cells stay in the table; a cell run again replaces its row
    saved = out / "pooling.json"
    rows: list[dict] = json.loads(saved.read_text()) if saved.is_file() else []
    for task, method, pooling in CELLS:
        if wanted and not any(f"{task}-{method}-{pooling}".startswith(w) for w in wanted):
            continue
        cmd = command(task, method, pooling, runs)
        shutil.rmtree(runs / f"{task}-{method}-{pooling}", ignore_errors=True)  # else the run lands in NAME-1
        started = time.time()
        proc = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
        row = {
            "task": task,
            "method": method,
            "pooling": pooling,
            "command": cmd,
            "wall_seconds": round(time.time() - started, 1),
        }
        summary = runs / f"{task}-{method}-{pooling}" / "summary.json"
        if proc.returncode == 0 and summary.is_file():
            s = json.loads(summary.read_text())
            row.update(
                accuracy=s["best"]["accuracy"],
                train_seconds=s["train_seconds"],
                trainable_params=s["trainable_params"],
                validation_examples=s["validation_examples"],
            )
        else:
            row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
        rows = [r for r in rows if (r["task"], r["method"], r["pooling"]) != (task, method, pooling)] + [row]
        print(table([row]).splitlines()[-1], flush=True)
        atomic_write_text(out / "pooling.json", json.dumps(rows, indent=1) + "\n")
        atomic_write_text(
            out / "pooling.md",
            "# Pooling comparison (all-MiniLM-L6-v2, 1 epoch, batch 16, bf16 only where it pays, one seed)\n\n"
            f"Produced by `{' '.join(['python', 'benchmarks/pooling.py', *sys.argv[1:]])}` on {sys.platform}; each "
            "row's exact command is in "
            "`pooling.json`. Common: `"
            + COMMON
            + "`; LoRA `"
            + LR["lora"]
            + "`, head `"
            + LR["head"]
            + "`, full `"
            + LR["full"]
            + "`; sst2 `"
            + TASK["sst2"]
            + "`.\n\n"
            + table(rows)
            + "\n",
        )
    print(table(rows))


if __name__ == "__main__":
    main()
