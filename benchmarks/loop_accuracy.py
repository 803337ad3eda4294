"""Does a speed setting of the loop change what a run learns? The same LoRA runs with one `train.*` setting at each
of its values, several seeds each, validation accuracy side by side (issue 8's accuracy checks).

    python benchmarks/loop_accuracy.py --key train.batching --values bucketed,random
    python benchmarks/loop_accuracy.py --key train.dropout_rng --values hash,torch
    python benchmarks/loop_accuracy.py --key train.bf16 --values false,true      [--tasks ...] [--seeds 0,1,2]

Every run is `python -m peftkit train <task>-lora <budget> <key>=<value> train.seed=<s>` (the exact commands are
written into the results) with the full validation split, evaluated once at the end; the values alternate order
from seed to seed. Writes benchmarks/results/accuracy_<setting>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import time
from pathlib import Path

from _common import out_flag

from peftkit.io import atomic_write_text

BUDGET = {
    "sst2": "task.max_train_examples=4000 train.epochs=1",
    "financial_phrasebank": "train.epochs=2",
    "banking77": "train.epochs=1",
}
# one pass, no dev split or early stopping: the converged recipes' extras would only add noise to the comparison
COMMON = (
    "train.eval_every=null train.progress=false train.lr=2e-3 task.dev_size=null train.patience=null "
    "train.max_epochs=null"
)


def run(task: str, key: str, value: str, seed: int, runs: Path) -> dict:
    name = f"{task}-{key.split('.')[-1]}-{value}-{seed}"
    cmd = (
        f"python -m peftkit train {task}-lora {BUDGET[task]} {COMMON} {key}={value} train.seed={seed} "
        f"train.output_dir={runs} train.run_name={name}"
    )
    started = time.time()
    proc = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
    row = {"task": task, "value": value, "seed": seed, "command": cmd, "wall_s": round(time.time() - started)}
    summary = runs / name / "summary.json"
    if proc.returncode == 0 and summary.is_file():
        s = json.loads(summary.read_text())
        row.update(accuracy=s["best"]["accuracy"], examples_per_s=s["train_examples_per_s"], bf16=s["bf16"])
    else:
        row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return row


def table(rows: list[dict], tasks: list[str], values: list[str]) -> list[str]:
    first, second = values
    lines = [
        f"| task | {first}: accuracy per seed | mean | {second}: accuracy per seed | mean | {first} - {second} (pt) "
        f"| training ex/s ({first} / {second}) |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for task in tasks:
        cols, means, speeds = [], {}, {}
        for value in values:
            mine = [r for r in rows if (r["task"], r["value"]) == (task, value) and "accuracy" in r]
            accs = [r["accuracy"] for r in mine]
            means[value] = statistics.mean(accs) if accs else None
            speeds[value] = statistics.median(r["examples_per_s"] for r in mine) if mine else None
            cols += [", ".join(f"{100 * a:.1f}" for a in accs), f"{100 * means[value]:.2f}" if accs else "-"]
        if None in means.values():
            lines.append(f"| {task} | {' | '.join(cols)} | - | - |")
            continue
        diff = 100 * (means[first] - means[second])
        speed = f"{speeds[first]:.0f} / {speeds[second]:.0f}"
        lines.append(f"| {task} | {' | '.join(cols)} | {diff:+.2f} | {speed} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", required=True, help="a train.* setting, e.g. train.dropout_rng")
    parser.add_argument("--values", required=True, help="its two values, comma-separated (the default first)")
    parser.add_argument("--tasks", default="sst2,financial_phrasebank")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default="/tmp/peftkit-accuracy-runs")
    parser.add_argument("--out", help="default: benchmarks/results/accuracy_<setting>")
    args = parser.parse_args()
    values = args.values.split(",")
    if len(values) != 2:
        parser.error("--values takes exactly two values")
    tasks = args.tasks.split(",")
    if unknown := [t for t in tasks if t not in BUDGET]:
        parser.error(f"--tasks: no budget for {', '.join(unknown)}; choose from {', '.join(BUDGET)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    rows = []
    for task in tasks:
        for seed in seeds:
            for value in values if seed % 2 == 0 else values[::-1]:
                rows.append(run(task, args.key, value, seed, Path(args.runs)))
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out or f"benchmarks/results/accuracy_{args.key.split('.')[-1]}")
    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    text = [
        f"# `{args.key}` = {' vs '.join(values)}: validation accuracy (LoRA, full validation split)",
        "",
        f"Command: `python benchmarks/loop_accuracy.py --key {args.key} --values {args.values} --tasks {args.tasks} "
        f"--seeds {args.seeds}{out_flag(args.out)}`; each run's exact command is in {out.with_suffix('.json').name}. "
        "Budgets: " + "; ".join(f"{t}: `{BUDGET[t]}`" for t in tasks) + f"; all: `{COMMON}`.",
        "",
        *table(rows, tasks, values),
    ]
    atomic_write_text(out.with_suffix(".md"), "\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
