"""Full fine-tuning with the embedding table's gradient as rows added into one kept buffer (the loop's way on the CPU,
`peftkit/embedding_grads.py`) against the dense backward's fresh zero-filled table every step: examples/s side by
side, and the proof that both learn the same (the validation loss and accuracy to every digit).

    python benchmarks/embedding_grads.py [--recipes sst2-full,mrpc-full] [--steps 60] [--repeats 3]

Each run is a fresh process (the allocator's state is part of what is measured) training `<recipe>` for --steps
steps on 3,000 training rows, evaluated at the end only; the two ways alternate A B, B A, ... Writes
benchmarks/results/embedding_grads.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WAYS = ("dense", "rows")


def child(recipe: str, way: str, steps: int, run_dir: str) -> dict:
    import peftkit.train as loop
    from peftkit.embedding_grads import EmbeddingGradBuffers
    from peftkit.recipe_files import load_config

    if way == "dense":  # the loop without the switch: every step allocates and zero-fills the table's gradient
        loop.EmbeddingGradBuffers.keep = classmethod(lambda cls, model: EmbeddingGradBuffers())
    overrides = [f"train.max_steps={steps}", "task.max_train_examples=3000", "train.patience=null"]
    summary = loop.train(load_config(recipe=recipe, overrides=[*overrides, "train.progress=false"]), run_dir=run_dir)
    return {
        "examples_per_s": summary.train_examples_per_s,
        "train_seconds": summary.train_seconds,
        "validation_loss": summary.final["loss"],
        "accuracy": summary.final["accuracy"],
        "bf16": summary.bf16,
        "overrides": overrides,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", default="sst2-full,mrpc-full")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/embedding_grads")
    parser.add_argument("--child", nargs=4, metavar=("RECIPE", "WAY", "STEPS", "RUN_DIR"))
    args = parser.parse_args()
    if args.child:
        recipe, way, steps, run_dir = args.child
        print("RESULT " + json.dumps(child(recipe, way, int(steps), run_dir)))
        return
    started, runs = time.perf_counter(), []
    for recipe in args.recipes.split(","):
        for repeat in range(args.repeats):
            for way in WAYS if repeat % 2 == 0 else WAYS[::-1]:
                run_dir = f"/tmp/peftkit-embedding-grads/{recipe}-{way}-{repeat}"
                cmd = [sys.executable, __file__, "--child", recipe, way, str(args.steps), run_dir]
                done = subprocess.run(
                    cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
                )
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    sys.exit(f"{recipe} {way} failed:\n{done.stderr[-2000:]}")
                runs.append({"recipe": recipe, "way": way, "repeat": repeat, **json.loads(line[-1][7:])})
                print(json.dumps(runs[-1]), flush=True)
    lines = [
        "# Embedding gradients: dense every step against rows into a kept buffer (full fine-tuning)",
        "",
        f"Command: `python {' '.join(sys.argv)}` ({time.perf_counter() - started:.0f} s; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores).",
        "",
        "| recipe | dense ex/s (median; each) | rows ex/s (median; each) | rows / dense | same validation loss |",
        "|---|---|---|---:|---|",
    ]
    for recipe in args.recipes.split(","):
        each = {w: [r for r in runs if r["recipe"] == recipe and r["way"] == w] for w in WAYS}
        speed = {w: statistics.median(r["examples_per_s"] for r in each[w]) for w in WAYS}
        losses = sorted({r["validation_loss"] for w in WAYS for r in each[w]})
        same = "yes" if len(losses) == 1 else f"no: {losses}"
        lines.append(
            f"| {recipe} | {speed['dense']:.1f} ({', '.join(str(r['examples_per_s']) for r in each['dense'])}) "
            f"| {speed['rows']:.1f} ({', '.join(str(r['examples_per_s']) for r in each['rows'])}) "
            f"| {speed['rows'] / speed['dense']:.2f}x | {same} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
