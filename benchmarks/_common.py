"""Shared by the small benchmark scripts: one training run per subprocess (clean peak-memory numbers), through
`peftkit.loop.train` (the function users call), and results written as markdown + JSON with the exact command."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# A CPU-sized budget: one pass over a seeded subsample of `rows` train rows at batch 16, <= eval_rows validation rows.
MAX_LENGTH = {"sst2": 64, "financial_phrasebank": 96}
TASKS = list(MAX_LENGTH)
COMMON = [
    "model.name_or_path=default",
    "train.batch_size=16",
    "train.progress=false",
    "train.log_every=10",
    "train.eval_every=null",
    "train.device=cpu",
    "train.warmup_ratio=0.06",
    "train.bf16=false",  # fp32 unless a script asks for bf16: the default (null) turns autocast on where it pays
]


def task_overrides(task: str, rows: int, eval_rows: int) -> list[str]:
    return [
        f"task.name={task}",
        f"task.max_train_examples={rows}",
        f"train.max_steps={-(-rows // 16)}",
        f"task.max_length={MAX_LENGTH[task]}",
        f"task.max_eval_examples={eval_rows}",
    ]


def add_budget_args(parser) -> None:
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--rows", type=int, default=480, help="train rows, seen once (steps = rows / 16)")
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default: benchmarks/results/<name>)")


def out_flag(out: Path | None) -> str:
    """The `--out` part of the command written into the results (empty when the default was used)."""
    return f" --out {out}" if out else ""


def run_cell(method: dict, overrides: list[str], run_dir: Path) -> dict:
    """Train one cell in a fresh Python process; return its summary (or {'error': ...})."""
    payload = json.dumps({"method": method, "overrides": overrides, "run_dir": str(run_dir)})
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, payload], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {proc.returncode}", "wall_s": time.perf_counter() - started}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(payload: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from peftkit.config import RunConfig
    from peftkit.loop import train
    from peftkit.recipe_files import apply_overrides

    spec = json.loads(payload)
    data = apply_overrides({"method": spec["method"]}, spec["overrides"])
    data["recipe"] = "bench"
    summary = train(RunConfig.from_dict(data), run_dir=spec["run_dir"]).to_dict()
    keep = (
        "best",
        "trainable_params",
        "total_params",
        "trainable_pct",
        "train_seconds",
        "train_examples_per_s",
        "peak_memory_mb",
        "baseline_memory_mb",
        "peak_memory_above_baseline_mb",
        "model_state_mb",
        "adapter_bytes",
        "steps",
        "examples_seen",
        "bf16",
        "environment",
    )
    print(json.dumps({k: summary.get(k) for k in keep}))


def write_results(
    out: Path | None,
    name: str,
    command: str,
    title: str,
    header: list[str],
    rows: list[list],
    raw: list[dict],
    notes: list[str],
) -> Path:
    """OUT.md (the table, as printed) and OUT.json (every cell), each written atomically; OUT defaults to
    benchmarks/results/<name>."""
    from peftkit.io import atomic_write_text

    out = Path(out) if out else RESULTS / name
    lines = [f"# {title}", "", "```bash", command, "```", ""]
    lines += ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += ["", *[f"- {n}" for n in notes], ""]
    md, data = out.with_name(out.name + ".md"), out.with_name(out.name + ".json")
    atomic_write_text(data, json.dumps({"command": command, "notes": notes, "cells": raw}, indent=1))
    atomic_write_text(md, "\n".join(lines))
    print("\n".join(lines))
    return md


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    _child(sys.argv[1])
