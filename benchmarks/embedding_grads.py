"""Full fine-tuning with the embedding table's gradient as rows added into one kept buffer (the loop's way on the CPU,
`peftkit/embedding_grads.py`) against the dense backward's fresh zero-filled table every step: examples/s side by
side, and the proof that both learn the same (the validation loss to every digit).

    python benchmarks/embedding_grads.py [--recipes sst2-full,mrpc-full] [--steps 60] [--repeats 3]
    python benchmarks/embedding_grads.py --profile [--repeats 1]     # where the dense way's time goes

Each run is a fresh process (the allocator's state is part of what is measured) training `<recipe>` for --steps
steps on 3,000 training rows, evaluated at the end only; the two ways alternate A B, B A, ... With --profile each
run is wrapped in torch.profiler and reports `aten::fill_`'s time a step (the zero-fill of the dense table is most
of it) against the profiled step. Writes benchmarks/results/embedding_grads[_profile].{md,json} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import write_results

WAYS = ("dense", "rows")


def child(recipe: str, way: str, steps: int, run_dir: str, profiled: bool) -> dict:
    import contextlib

    import peftkit.loop as loop
    from peftkit.embedding_grads import EmbeddingGradBuffers
    from peftkit.recipe_files import load_config

    if way == "dense":  # the loop without the switch: every step allocates and zero-fills the table's gradient
        loop.EmbeddingGradBuffers.keep = classmethod(lambda cls, model: EmbeddingGradBuffers())
    overrides = [f"train.max_steps={steps}", "task.max_train_examples=3000", "train.patience=null"]
    config = load_config(recipe=recipe, overrides=[*overrides, "train.progress=false"])
    profiler = contextlib.nullcontext()
    if profiled:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
    with profiler:
        summary = loop.train(config, run_dir=run_dir)
    result = {
        "examples_per_s": summary.train_examples_per_s,
        "train_seconds": summary.train_seconds,
        "validation_loss": summary.final["loss"],
        "bf16": summary.bf16,
        "overrides": overrides,
    }
    if profiled:  # the final evaluation runs inside the profiler too: it fills little and has no backward
        fill = sum(e.self_cpu_time_total for e in profiler.key_averages() if e.key == "aten::fill_") / 1e3
        result.update(step_ms=1e3 * summary.train_seconds / steps, fill_ms_per_step=fill / steps)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", default="sst2-full,mrpc-full")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="torch.profiler around each run: fill_ time a step")
    parser.add_argument(
        "--out", help="write OUT.md and OUT.json (default: benchmarks/results/embedding_grads[_profile])"
    )
    parser.add_argument("--child", nargs=5, metavar=("RECIPE", "WAY", "STEPS", "RUN_DIR", "PROFILE"))
    args = parser.parse_args()
    if args.child:
        recipe, way, steps, run_dir, profiled = args.child
        print("RESULT " + json.dumps(child(recipe, way, int(steps), run_dir, profiled == "1")))
        return
    started, runs, work = time.perf_counter(), [], tempfile.mkdtemp(prefix="peftkit-embedding-grads-")
    recipes = args.recipes.split(",")
    for recipe in recipes:
        for repeat in range(args.repeats):
            for way in WAYS if repeat % 2 == 0 else WAYS[::-1]:
                run_dir = f"{work}/{recipe}-{way}-{repeat}"
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    recipe,
                    way,
                    str(args.steps),
                    run_dir,
                    str(int(args.profile)),
                ]
                env = {**os.environ, "PYTHONWARNINGS": "ignore"}
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    sys.exit(f"{recipe} {way} failed:\n{done.stderr[-2000:]}")
                runs.append({"recipe": recipe, "way": way, "repeat": repeat, **json.loads(line[-1][7:])})
                print(json.dumps(runs[-1]), flush=True)
    command = f"python benchmarks/embedding_grads.py {' '.join(sys.argv[1:])}"
    notes = [
        f"{time.perf_counter() - started:.0f} s; {os.cpu_count()} cores; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; bf16 {runs[0]['bf16']}",
    ]
    if args.profile:
        header = ["recipe", "way", "profiled ms/step", "aten::fill_ ms/step", "fill_ share of the step"]
        rows = [
            [r["recipe"], r["way"], f"{r['step_ms']:.0f}", f"{r['fill_ms_per_step']:.1f}",
             f"{r['fill_ms_per_step'] / r['step_ms']:.0%}"]
            for r in runs
        ]  # fmt: skip
        title = "Embedding gradients: where the dense way's step time goes (torch.profiler, full fine-tuning)"
        write_results(args.out, "embedding_grads_profile", command, title, header, rows, runs, notes)
        return
    header = [
        "recipe",
        "dense ex/s (median; each)",
        "rows ex/s (median; each)",
        "rows / dense",
        "same validation loss",
    ]
    rows = []
    for recipe in recipes:
        each = {w: [r for r in runs if r["recipe"] == recipe and r["way"] == w] for w in WAYS}
        speed = {w: statistics.median(r["examples_per_s"] for r in each[w]) for w in WAYS}
        losses = sorted({r["validation_loss"] for r in each["dense"] + each["rows"]})
        rows.append(
            [recipe]
            + [f"{speed[w]:.1f} ({', '.join(str(r['examples_per_s']) for r in each[w])})" for w in WAYS]
            + [f"{speed['rows'] / speed['dense']:.2f}x", "yes" if len(losses) == 1 else f"no: {losses}"]
        )
    title = "Embedding gradients: dense every step against rows into a kept buffer (full fine-tuning)"
    write_results(args.out, "embedding_grads", command, title, header, rows, runs, notes)


if __name__ == "__main__":
    main()
