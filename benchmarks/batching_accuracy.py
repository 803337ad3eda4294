"""Does length bucketing change what a run learns? The same LoRA runs with `train.batching=bucketed` (the default)
and `random`, several seeds each, validation accuracy side by side (issue 8's accuracy check).

    python benchmarks/batching_accuracy.py [--tasks sst2,financial_phrasebank] [--seeds 0,1,2] [--runs DIR]

Every run is `python -m peftkit train <task>-lora <budget> train.batching=<b> train.seed=<s>` (the exact commands
are written into the results) with the full validation split, evaluated once at the end. Writes
benchmarks/results/batching_accuracy.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import time
from pathlib import Path

BUDGET = {
    "sst2": "task.max_train_examples=4000 train.epochs=1",
    "financial_phrasebank": "train.epochs=2",
    "banking77": "train.epochs=1",
}
COMMON = "train.eval_every=null train.progress=false train.lr=2e-3"


def run(task: str, batching: str, seed: int, runs: Path) -> dict:
    name = f"{task}-{batching}-{seed}"
    cmd = (
        f"python -m peftkit train {task}-lora {BUDGET[task]} {COMMON} train.batching={batching} train.seed={seed} "
        f"train.output_dir={runs} train.run_name={name}"
    )
    started = time.time()
    proc = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
    row = {"task": task, "batching": batching, "seed": seed, "command": cmd, "wall_s": round(time.time() - started)}
    summary = runs / name / "summary.json"
    if proc.returncode == 0 and summary.is_file():
        s = json.loads(summary.read_text())
        row.update(accuracy=s["best"]["accuracy"], examples_per_s=s["train_examples_per_s"])
    else:
        row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return row


def table(rows: list[dict], tasks: list[str]) -> list[str]:
    lines = [
        "| task | bucketed: accuracy per seed | mean | random: accuracy per seed | mean | bucketed - random (pt) |",
        "|---|---|---:|---|---:|---:|",
    ]
    for task in tasks:
        cols, means = [], {}
        for batching in ("bucketed", "random"):
            accs = [r["accuracy"] for r in rows if (r["task"], r["batching"]) == (task, batching) and "accuracy" in r]
            means[batching] = statistics.mean(accs) if accs else None
            cols += [", ".join(f"{100 * a:.1f}" for a in accs), f"{100 * means[batching]:.2f}" if accs else "-"]
        diff = 100 * (means["bucketed"] - means["random"]) if None not in means.values() else None
        lines.append(f"| {task} | {' | '.join(cols)} | {diff:+.2f} |" if diff is not None else f"| {task} | - |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,financial_phrasebank")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default="/tmp/peftkit-batching-runs")
    parser.add_argument("--out", default="benchmarks/results/batching_accuracy")
    args = parser.parse_args()
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    rows = []
    for task in tasks:
        for seed in seeds:
            for batching in ("bucketed", "random") if seed % 2 == 0 else ("random", "bucketed"):
                rows.append(run(task, batching, seed, Path(args.runs)))
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    text = [
        "# Length-bucketed vs random batches: validation accuracy (LoRA, full validation split)",
        "",
        f"Command: `python benchmarks/batching_accuracy.py --tasks {args.tasks} --seeds {args.seeds}`; each run's "
        "exact command is in batching_accuracy.json. Budgets: "
        + "; ".join(f"{t}: `{BUDGET[t]}`" for t in tasks)
        + f"; all: `{COMMON}`.",
        "",
        *table(rows, tasks),
    ]
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
