"""`peftkit bench`: train every (task, method, seed) cell through the one loop and tabulate what each method costs.

Read top to bottom:
  profiles (budgets as plain data) -> the grid of cells -> each cell's config (its recipe `<task>-<method>` plus the
  profile's dotted overrides, exactly what a user would type) -> each cell trained by `train()` in its own spawned
  process (clean peak-memory numbers, a crash cannot take the grid down) -> one JSON file per cell in OUT/cells/
  -> `build_report(OUT)`: results.json / results.csv / results.md and per-task plots in OUT/plots/.

Resumable by construction: a cell whose JSON file exists is skipped (delete it to rerun), every file is written
atomically, and a failing cell is recorded as `failed` with its error while the others go on.
"""
from __future__ import annotations

import csv
import io
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftkit.config import RunConfig, apply_overrides, list_recipes, load_config
from peftkit.errors import PeftkitError, unknown_choice
from peftkit.io import atomic_write_json, atomic_write_text, read_json
from peftkit.measure import machine_manifest

# --------------------------------------------------------------------------------------------- profiles

ALL_TASKS = ("sst2", "banking77", "financial_phrasebank", "rte", "mrpc")
ALL_METHODS = ("full", "bitfit", "adapter", "lora", "dora", "adalora", "ia3", "prompt")


@dataclass(frozen=True)
class Profile:
    """A named budget: which cells to run by default and the overrides that size every cell.

    `overrides` apply to every cell, then `task_overrides[task]`, then `method_overrides[method]`; all are the
    dotted strings users pass to
    `peftkit train`, applied on top of the recipe, so a cell's budget is visible and reproducible by hand.
    """

    name: str
    description: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    more_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tasks that get extra seeds
    overrides: tuple[str, ...] = ()
    task_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    method_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # e.g. short-budget learning rates
    bf16_on_cuda: bool = False  # bf16 autocast when the cell lands on a bf16-capable GPU; fp32 elsewhere
    latency_examples: int = 256  # validation rows timed for inference latency after training
    latency_batch_size: int = 32

    def seeds_for(self, task: str) -> tuple[int, ...]:
        return self.more_seeds.get(task, self.seeds)

    def overrides_for(self, task: str, method: str = "") -> list[str]:
        return [*self.overrides, *self.task_overrides.get(task, ()), *self.method_overrides.get(method, ())]


# Shared by the CPU-sized profiles: evaluate once at the end (best == final), no checkpoints, quiet inner bar.
_CPU_SIZED = ("train.eval_every=null", "train.checkpoint_every=null", "train.bf16=false", "train.device=auto")

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="End-to-end check in a minute or two: 8 steps on 256 training rows, 64 evaluation rows.",
        tasks=("sst2", "rte"),
        methods=("lora", "bitfit", "ia3"),
        seeds=(0,),
        overrides=(*_CPU_SIZED, "train.max_steps=8", "train.log_every=4", "task.max_train_examples=256",
                   "task.max_eval_examples=64", "task.max_length=64"),
        latency_examples=32,
        latency_batch_size=16,
    ),
    "cpu": Profile(
        name="cpu",
        description=(
            "The whole grid on a 2-core CPU in about an hour: 5 tasks x 8 methods, seed 0, plus seeds 1 and 2 for "
            "sst2 and financial_phrasebank (72 cells). Each cell makes one pass over a seeded subsample of train at "
            "batch 16 with bf16 autocast, sequences truncated per task, evaluation once at the end on at most 500 "
            "validation (and test) rows. PEFT methods get short-budget learning rates (see method_overrides)."
        ),
        tasks=ALL_TASKS,
        methods=ALL_METHODS,
        seeds=(0,),
        more_seeds={"sst2": (0, 1, 2), "financial_phrasebank": (0, 1, 2)},
        overrides=(*_CPU_SIZED[:2], "train.bf16=true", "train.device=auto", "train.batch_size=16",
                   "task.max_eval_examples=500"),
        task_overrides={  # max_train_examples = max_steps x batch 16: every row seen once
            "sst2": ("train.max_steps=192", "task.max_train_examples=3072", "task.max_length=64"),
            "banking77": ("train.max_steps=300", "task.max_train_examples=4800", "task.max_length=64"),
            "financial_phrasebank": ("train.max_steps=150", "task.max_train_examples=2400", "task.max_length=96"),
            "rte": ("train.max_steps=100", "task.max_train_examples=1600", "task.max_length=128"),
            "mrpc": ("train.max_steps=125", "task.max_train_examples=2000", "task.max_length=128"),
        },
        # The recipes' learning rates are the papers' multi-epoch settings. In one pass of a few hundred updates
        # the small-update methods need larger steps: measured on sst2 at this budget, LoRA reached 0.748 at the
        # recipe's 5e-4, 0.768 at 1e-3 and 0.800 at 2e-3, against 0.788 for full fine-tuning at 5e-5. AdaLoRA
        # starts its singular values at zero, so it grows slower still: 0.613 at 2e-3 (3 seeds), 0.800 at 5e-3.
        method_overrides={
            "lora": ("train.lr=2e-3",), "dora": ("train.lr=2e-3",), "adalora": ("train.lr=5e-3",),
            "adapter": ("train.lr=2e-3",), "bitfit": ("train.lr=2e-3",), "ia3": ("train.lr=6e-3",),
        },
        latency_examples=128,
        latency_batch_size=32,
    ),
    "full": Profile(
        name="full",
        description=(
            "Paper-like, for a GPU machine: all training data, the recipes' epochs and evaluation schedule (best "
            "evaluation kept), full validation/test sets, 3 seeds, bf16 on CUDA (fp32 on CPU). Device-agnostic."
        ),
        tasks=ALL_TASKS,
        methods=ALL_METHODS,
        seeds=(0, 1, 2),
        overrides=("train.max_steps=null", "task.max_train_examples=null", "task.max_eval_examples=null",
                   "train.device=auto"),
        bf16_on_cuda=True,
        latency_examples=512,
        latency_batch_size=32,
    ),
}


# --------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Cell:
    """One (task, method, seed) run. `task` is a built-in task name or a task folder / data file path."""

    task: str
    method: str
    seed: int

    @property
    def task_label(self) -> str:
        return task_label(self.task)

    @property
    def id(self) -> str:
        return f"{self.task_label}__{self.method}__seed{self.seed}"


def task_label(task: str) -> str:
    """The name used in file names and tables: the built-in name, or the folder/file stem of a path."""
    return Path(task).stem if "/" in task or "." in task else task


def plan_cells(profile: Profile, tasks: list[str], methods: list[str], seeds: list[int] | None) -> list[Cell]:
    """Tasks outermost, so one task's tables fill up first; explicit --seeds replace the profile's per-task seeds."""
    return [Cell(task, method, seed) for task in tasks for method in methods
            for seed in (seeds if seeds is not None else profile.seeds_for(task_label(task)))]


def parse_list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def validate_choices(profile_name: str, tasks: list[str], methods: list[str], seeds: list[str] | None) -> list[int] | None:
    """Check everything the grid names before anything trains, so a typo costs seconds, not an hour."""
    from peftkit.adapters import available_methods
    from peftkit.data import BUILTIN_TASKS, is_task_source

    if profile_name not in PROFILES:
        raise unknown_choice("bench profile", profile_name, PROFILES)
    try:
        int_seeds = None if seeds is None else [int(s) for s in seeds]
    except ValueError:
        raise PeftkitError(f"--seeds must be comma-separated integers, got {','.join(seeds)!r}") from None
    if not tasks or not methods:
        raise PeftkitError("the grid is empty: give at least one task (--tasks) and one method (--methods)")
    for task in tasks:
        if task not in BUILTIN_TASKS and not is_task_source(task):
            raise unknown_choice("task (or a task folder / .jsonl / .csv file)", task, BUILTIN_TASKS)
    known = available_methods()
    for method in methods:
        if method not in known:
            raise unknown_choice("method", method, known)
    recipes = list_recipes()
    missing = [f"{t}-{m}" for t in tasks if t in BUILTIN_TASKS for m in methods if f"{t}-{m}" not in recipes]
    if missing:
        raise PeftkitError(f"bench cells use the recipe <task>-<method>; missing: {', '.join(missing)} "
                           f"(add them to recipes/ or narrow --tasks/--methods)")
    return int_seeds


def cell_config(cell: Cell, profile: Profile, out: Path, model: str | None, data_dir: str | None) -> tuple[RunConfig, list[str]]:
    """The cell's recipe plus, in order, the profile's overrides and the cell's own (seed, model, data, run folder).

    A built-in task uses its recipe `<task>-<method>`; a task folder or file has none, so it gets the method's
    defaults (what `peftkit train --config` would give a user's YAML naming only the task and the method).
    """
    overrides = profile.overrides_for(cell.task_label, cell.method)
    if profile.bf16_on_cuda:
        overrides.append(f"train.bf16={'true' if _cuda_bf16() else 'false'}")
    overrides += [f"train.seed={cell.seed}", "train.progress=false", f"train.output_dir={out / 'runs'}",
                  f"train.run_name={cell.id}"]
    if model:
        overrides.append(f"model.name_or_path={model}")
    if data_dir:
        overrides.append(f"task.data_dir={data_dir}")
    recipe = f"{cell.task}-{cell.method}"
    if recipe in list_recipes():
        return load_config(recipe=recipe, overrides=overrides), overrides
    data = apply_overrides({"task": {"name": cell.task}, "method": {"name": cell.method}}, overrides)
    data["recipe"] = f"{cell.task_label}-{cell.method}"
    return RunConfig.from_dict(data), overrides


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# --------------------------------------------------------------------------------------------- running


def run_bench(profile_name: str = "smoke", tasks: list[str] | None = None, methods: list[str] | None = None,
              seeds: list[str] | None = None, out: str | Path | None = None, model: str | None = None,
              data_dir: str | None = None, progress: bool = True, command: str | None = None) -> dict[str, int]:
    """Run every cell of the grid that has no result file yet, then rebuild the report.

    Returns counts: planned cells, skipped (already had a result), ran now, failed (in the whole grid).
    """
    profile = PROFILES.get(profile_name)
    tasks = list(tasks or (profile.tasks if profile else ()))
    methods = list(methods or (profile.methods if profile else ()))
    int_seeds = validate_choices(profile_name, tasks, methods, seeds)
    out = Path(out or f"benchmarks/results/{profile.name}")
    cells = plan_cells(profile, tasks, methods, int_seeds)
    if len({c.id for c in cells}) != len(cells):
        raise PeftkitError("two tasks share a name (folder/file stem); rename one so result files do not collide")

    todo = [c for c in cells if not cell_path(out, c).exists()]
    manifest_base = {"profile": profile.name, "profile_description": profile.description, "command": command,
                     **machine_manifest()}
    counts = {"planned": len(cells), "skipped": len(cells) - len(todo), "ran": 0}
    bar = _cells_bar(len(cells), counts["skipped"], progress)
    for cell in todo:
        bar.set_postfix_str(cell.id)
        record = run_cell(cell, profile, out, model, data_dir, manifest_base)
        atomic_write_json(cell_path(out, cell), record)
        counts["ran"] += 1
        if record["status"] == "failed":
            bar.write(f"peftkit bench: {cell.id} failed: {record['error'].splitlines()[0]}")
        bar.update(1)
    bar.close()
    build_report(out)
    counts["failed"] = sum(read_json(cell_path(out, c))["status"] != "ok" for c in cells)  # this grid, any run
    return counts


def cell_path(out: Path, cell: Cell) -> Path:
    return Path(out) / "cells" / f"{cell.id}.json"


def _cells_bar(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, disable=not enabled, desc="bench", unit="cell", dynamic_ncols=True,
                bar_format="{desc}: {n}/{total} cells |{bar}| [{elapsed}<{remaining}] {postfix}")


def run_cell(cell: Cell, profile: Profile, out: Path, model: str | None, data_dir: str | None,
             manifest_base: dict[str, Any]) -> dict[str, Any]:
    """Resolve, train and measure one cell in a child process; any failure becomes a `failed` record."""
    started = datetime.now(timezone.utc)
    record: dict[str, Any] = {"cell": cell.id, "task": cell.task_label, "method": cell.method, "seed": cell.seed,
                              "status": "failed", "error": None}
    manifest = {**manifest_base, "task_source": cell.task, "recipe": None, "overrides": None, "config": None,
                "started_at": started.isoformat(timespec="seconds")}
    try:
        config, overrides = cell_config(cell, profile, out, model, data_dir)
        manifest.update(recipe=config.recipe, overrides=overrides, config=config.to_dict())
        run_dir = Path(config.train.output_dir) / config.train.run_name
        shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of an interrupted attempt
        measured = _in_child(config.to_dict(), str(run_dir), profile.latency_examples, profile.latency_batch_size)
        record.update(status="ok", **measured)
    except PeftkitError as e:
        record["error"] = f"PeftkitError: {e}"
    except CellCrashed as e:
        record["error"] = str(e)
    record["cell_seconds"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
    record["manifest"] = manifest
    return record


class CellCrashed(Exception):
    """The child process raised something other than a PeftkitError, or died (OOM killer, segfault)."""


def _in_child(config: dict[str, Any], run_dir: str, latency_examples: int, latency_batch_size: int) -> dict[str, Any]:
    """Run `measure_cell` in a fresh spawned process: its own peak RSS / CUDA peak, and no state left behind."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(send, config, run_dir, latency_examples, latency_batch_size))
    child.start()
    send.close()
    try:
        try:
            kind, payload = receive.recv()
        except EOFError:
            kind, payload = "crash", None
        child.join()
    except KeyboardInterrupt:  # Ctrl-C reaches the child too; make sure it is gone before we unwind
        child.terminate()
        child.join()
        raise
    if kind == "ok":
        return payload
    if kind == "peftkit":
        raise PeftkitError(payload)
    if kind == "interrupted":
        raise KeyboardInterrupt
    raise CellCrashed(payload or f"the cell's process died with exit code {child.exitcode} (out of memory?)")


def _child_main(send, config: dict[str, Any], run_dir: str, latency_examples: int, latency_batch_size: int) -> None:
    from peftkit.console import quiet_libraries

    quiet_libraries()
    try:
        send.send(("ok", measure_cell(RunConfig.from_dict(config), Path(run_dir), latency_examples, latency_batch_size)))
    except PeftkitError as e:
        send.send(("peftkit", str(e)))
    except KeyboardInterrupt:
        send.send(("interrupted", None))
    except BaseException as e:  # noqa: BLE001 - a bench cell records any crash and the grid goes on
        send.send(("crash", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"))
    finally:
        send.close()


def measure_cell(config: RunConfig, run_dir: Path, latency_examples: int, latency_batch_size: int) -> dict[str, Any]:
    """Train through `train()`, time inference on the saved adapter, then drop the weights (the tables keep sizes)."""
    from peftkit.artifacts import read_meta
    from peftkit.train import train

    s = train(config, run_dir=run_dir).to_dict()
    latency = inference_latency(config, run_dir / "adapter", latency_examples, latency_batch_size)
    task_metrics = read_meta(run_dir / "adapter")["task"]["metrics"]
    for heavy in ("adapter", "checkpoints"):  # keep config.yaml, metrics.jsonl, summary.json; weights can be MBs
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    on_cuda = s["memory_kind"] == "cuda_max_allocated"
    return {
        "task_metrics": task_metrics,  # the task's reported metrics, first = main (e.g. accuracy; mrpc adds f1)
        "validation": {k: v for k, v in s["best"].items() if k != "step"},  # the evaluation the run kept
        "test": s["test"],  # None where the task has no labelled test split
        "kept": s["kept"], "kept_step": s["best"]["step"], "final_validation": s["final"],
        "trainable_params": s["trainable_params"], "total_params": s["total_params"], "trainable_pct": s["trainable_pct"],
        "adapter_bytes": s["adapter_bytes"],
        # headline memory: CUDA max_memory_allocated, or on CPU the peak RSS above the loaded-model baseline
        "peak_memory_mb": s["peak_memory_mb"] if on_cuda else s["peak_memory_above_baseline_mb"],
        "memory_kind": s["memory_kind"], "process_peak_memory_mb": s["peak_memory_mb"],
        "baseline_memory_mb": s["baseline_memory_mb"], "model_state_mb": s["model_state_mb"],
        "train_seconds": s["train_seconds"], "train_examples_per_s": s["train_examples_per_s"],
        "steps": s["steps"], "examples_seen": s["examples_seen"], "train_examples": s["train_examples"],
        "validation_examples": s["validation_examples"],
        "latency_ms_per_example": latency["ms_per_example"], "latency": latency,
        "device": s["device"], "bf16": s["bf16"], "environment": s["environment"],
    }


def inference_latency(config: RunConfig, adapter_dir: Path, examples: int, batch_size: int) -> dict[str, Any]:
    """Milliseconds per example to label validation rows with the saved adapter (one warm-up batch first)."""
    import torch

    from peftkit.artifacts import load
    from peftkit.data import encode, load_task
    from peftkit.inference import predict_logits
    from peftkit.modeling import resolve_device

    loaded = load(adapter_dir, base=config.model.name_or_path)
    device = resolve_device(config.train.device)
    model = loaded.model.to(device)
    rows = load_task(config.task, seed=config.train.seed).split("validation")[:examples]
    split = encode(rows, loaded.tokenizer, config.task.max_length)
    warmup = encode(rows[:batch_size], loaded.tokenizer, config.task.max_length)
    predict_logits(model, warmup, batch_size, device, config.train.bf16)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    predict_logits(model, split, batch_size, device, config.train.bf16)  # returns CPU tensors: synchronised
    seconds = time.perf_counter() - started
    return {"ms_per_example": round(1000 * seconds / max(len(split), 1), 3), "examples": len(split),
            "batch_size": batch_size, "seconds": round(seconds, 3), "device": str(device), "bf16": config.train.bf16}


# --------------------------------------------------------------------------------------------- the report

METRIC_ORDER = ("accuracy", "macro_f1", "f1")
NUMERIC_COLUMNS = ("trainable_params", "trainable_pct", "adapter_mb", "peak_memory_mb", "model_state_mb",
                   "train_seconds", "train_examples_per_s", "latency_ms_per_example")
COLUMN_HELP = {
    "method": "adaptation method (recipe <task>-<method>)",
    "seeds": "successful seeds / cells run",
    "trainable %": "trainable parameters (task head included) as % of all parameters in the trained model",
    "adapter MB": "size on disk of the saved weights (safetensors); full fine-tuning saves the whole model",
    "peak mem MB": "CPU: process peak RSS during training above the RSS after loading the model; CUDA: max_memory_allocated",
    "state MB": "tensor memory of weights + gradients + AdamW moments of trainable parameters (analytic)",
    "train s": "training wall time (excludes data loading and final evaluation)",
    "ex/s": "training examples per second",
    "latency ms": "inference milliseconds per validation example at the profile's batch size, adapter loaded from disk",
}


def load_cells(out: str | Path) -> list[dict[str, Any]]:
    folder = Path(out) / "cells"
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise PeftkitError(f"no cell results in {folder}; run `peftkit bench --out {out}` first")
    return [read_json(f) for f in files]


def build_report(out: str | Path) -> dict[str, Any]:
    """Rebuild results.json, results.csv, results.md and plots/ from OUT/cells/*.json alone."""
    out = Path(out)
    cells = load_cells(out)
    rows = aggregate(cells)
    tasks = _ordered({r["task"] for r in rows}, ALL_TASKS)
    methods = _ordered({r["method"] for r in rows}, ALL_METHODS)
    report = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profiles": sorted({c["manifest"]["profile"] for c in cells}),
        "environment": _environment(cells),
        "budgets": budgets(cells),
        "summary": {m: {t: _main(rows, t, m) for t in tasks} for m in methods},
        "rows": rows,
        "cells": [{k: c.get(k) for k in ("cell", "task", "method", "seed", "status", "error", "validation", "test")}
                  for c in cells],
    }
    atomic_write_json(out / "results.json", report)
    atomic_write_text(out / "results.csv", to_csv(rows))
    plots = draw_plots(rows, tasks, out / "plots")
    atomic_write_text(out / "results.md", to_markdown(report, tasks, methods, plots, out))
    return report


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method): metric mean/std over the ok seeds, cost columns averaged over them."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["task"], c["method"]), []).append(c)
    rows = []
    for (task, method), group in groups.items():
        ok = [c for c in group if c["status"] == "ok"]
        row: dict[str, Any] = {"task": task, "method": method, "cells": len(group), "ok": len(ok),
                               "seeds": sorted(c["seed"] for c in ok),
                               "main_metric": ok[0]["task_metrics"][0] if ok else None,
                               "errors": sorted({c["error"].splitlines()[0] for c in group if c["status"] != "ok"})}
        for split in ("validation", "test"):
            for metric in METRIC_ORDER:
                values = [c[split][metric] for c in ok if c.get(split) and metric in c["task_metrics"]]
                row[f"{split}_{metric}_mean"], row[f"{split}_{metric}_std"] = _mean_std(values)
        for column in NUMERIC_COLUMNS:
            source = "adapter_bytes" if column == "adapter_mb" else column
            values = [c[source] for c in ok if c.get(source) is not None]
            mean = statistics.fmean(values) if values else None
            row[column] = None if mean is None else (mean / 2**20 if column == "adapter_mb" else mean)
        row["memory_kind"] = ok[0]["memory_kind"] if ok else None
        row["steps"] = ok[0]["steps"] if ok else None
        row["lr"] = ok[0]["manifest"]["config"]["train"]["lr"] if ok else None
        rows.append(row)
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    return sorted(rows, key=lambda r: (_task_rank(r["task"]), order.get(r["method"], len(order)), r["method"]))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _task_rank(task: str) -> tuple[int, str]:
    return (ALL_TASKS.index(task) if task in ALL_TASKS else len(ALL_TASKS), task)


def _ordered(names: set[str], canonical: tuple[str, ...]) -> list[str]:
    return [n for n in canonical if n in names] + sorted(names - set(canonical))


def _main(rows: list[dict[str, Any]], task: str, method: str) -> dict[str, Any] | None:
    for r in rows:
        if r["task"] == task and r["method"] == method and r["main_metric"]:
            m = r["main_metric"]
            return {"metric": m, "mean": r[f"validation_{m}_mean"], "std": r[f"validation_{m}_std"], "seeds": len(r["seeds"])}
    return None


def budgets(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task, the budget the cells actually ran with (read from their resolved configs)."""
    out: dict[str, dict[str, Any]] = {}
    for c in sorted(cells, key=lambda c: _task_rank(c["task"])):
        config = c["manifest"].get("config")
        if c["status"] != "ok" or not config or c["task"] in out:
            continue
        t, tr = config["task"], config["train"]
        out[c["task"]] = {"profile": c["manifest"]["profile"], "max_train_examples": t["max_train_examples"],
                          "train_examples": c["train_examples"], "max_steps": tr["max_steps"], "epochs": tr["epochs"],
                          "steps": c["steps"], "batch_size": tr["batch_size"], "grad_accum_steps": tr["grad_accum_steps"],
                          "max_length": t["max_length"], "max_eval_examples": t["max_eval_examples"],
                          "validation_examples": c["validation_examples"], "eval_every": tr["eval_every"],
                          "bf16": tr["bf16"], "device": c["device"]}
    return out


def _environment(cells: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [c for c in cells if c["status"] == "ok"] or cells
    first = ok[0]
    keys = ("git_commit", "git_dirty", "cpu_model", "cpu_count", "platform", "command")
    return {**(first.get("environment") or {}), **{k: first["manifest"].get(k) for k in keys}}


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns = ["task", "method", "cells", "ok", "seeds", "main_metric"]
    columns += [f"{s}_{m}_{a}" for s in ("validation", "test") for m in METRIC_ORDER for a in ("mean", "std")]
    columns += [*NUMERIC_COLUMNS, "memory_kind", "steps", "lr", "errors"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**{k: r[k] for k in columns}, "seeds": " ".join(map(str, r["seeds"])), "errors": " | ".join(r["errors"])})
    return buffer.getvalue()


def _pm(mean: float | None, std: float | None) -> str:
    """A metric as a percentage, `mean ± std` over seeds (no std for one seed)."""
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if digits == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def to_markdown(report: dict[str, Any], tasks: list[str], methods: list[str], plots: dict[str, list[str]], out: Path) -> str:
    rows, env = report["rows"], report["environment"]
    lines = [f"# peftkit bench results ({', '.join(report['profiles'])} profile)", ""]
    if env.get("command"):
        lines += [f"Command: `{env['command']}`", ""]
    lines += [f"Machine: {env.get('cpu_model')} ({env.get('cpu_count')} cores, torch threads {env.get('torch_threads')}), "
              f"GPU: {env.get('gpu') or 'none'}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
              f"peft {env.get('peft')}, peftkit {env.get('peftkit')}; git {env.get('git_commit') or 'unknown'}"
              f"{' (uncommitted changes)' if env.get('git_dirty') else ''}. Generated {report['generated_at']}.", ""]

    lines += ["## Summary: main validation metric (%), mean ± std over seeds", ""]
    header = ["method", *tasks, "mean"]
    table = []
    for m in methods:
        cells = [report["summary"][m].get(t) for t in tasks]
        values = [c["mean"] for c in cells if c and c["mean"] is not None]
        mean = statistics.fmean(values) if len(values) == len(tasks) else None
        table.append([m, *(_pm(c["mean"], c["std"]) if c else "-" for c in cells), _pm(mean, None)])
    lines += _md_table(header, table)
    mains = {t: next((r["main_metric"] for r in rows if r["task"] == t and r["main_metric"]), "-") for t in tasks}
    lines += ["", "Main metric per task: " + ", ".join(f"{t}: {m}" for t, m in mains.items()) +
              ". The mean column averages tasks only where a method has every task.", ""]

    lines += ["## Budgets", ""]
    b_header = ["task", "train rows", "steps", "batch", "max length", "eval rows", "eval every", "bf16", "device"]
    b_rows = [[t, _num(b["train_examples"], 0), b["steps"], b["batch_size"] * b["grad_accum_steps"], b["max_length"],
               b["validation_examples"], b["eval_every"] or "end", b["bf16"], b["device"]]
              for t, b in report["budgets"].items()]
    lines += _md_table(b_header, b_rows) + [""]

    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        metrics = [m for m in METRIC_ORDER if any(r[f"validation_{m}_mean"] is not None for r in task_rows)]
        has_test = any(r[f"test_{m}_mean"] is not None for r in task_rows for m in metrics)
        lines += [f"## {task}", ""]
        header = ["method", "seeds", *(f"val {m}" for m in metrics), *(f"test {m}" for m in metrics if has_test),
                  "trainable %", "trainable", "adapter MB", "peak mem MB", "state MB", "train s", "ex/s", "latency ms", "lr"]
        table = []
        for r in task_rows:
            table.append([r["method"], f"{r['ok']}/{r['cells']}",
                          *(_pm(r[f"validation_{m}_mean"], r[f"validation_{m}_std"]) for m in metrics),
                          *(_pm(r[f"test_{m}_mean"], r[f"test_{m}_std"]) for m in metrics if has_test),
                          _num(r["trainable_pct"], 3), _num(r["trainable_params"], 0), _num(r["adapter_mb"], 2),
                          _num(r["peak_memory_mb"], 0), _num(r["model_state_mb"], 0), _num(r["train_seconds"]),
                          _num(r["train_examples_per_s"]), _num(r["latency_ms_per_example"], 2),
                          f"{r['lr']:g}" if r["lr"] is not None else "-"])
        lines += _md_table(header, table) + [""]
        lines += [f"![{task}: {Path(p).stem}]({Path(p).relative_to(out).as_posix()})" for p in plots.get(task, [])]
        lines += [""]

    failed = [c for c in report["cells"] if c["status"] != "ok"]
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- `{c['cell']}`: {c['error'].splitlines()[0]}" for c in failed] + [""]
    lines += ["## Columns", ""] + [f"- **{k}**: {v}" for k, v in COLUMN_HELP.items()]
    lines += ["- **val/test metric**: the evaluation the run kept (best on validation for most methods, final for "
              "AdaLoRA), in %; test only where the task has a labelled test split", ""]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    aligns = ["---" if i == 0 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(map(str, r)) + " |" for r in (header, aligns, *rows)]


def draw_plots(rows: list[dict[str, Any]], tasks: list[str], folder: Path) -> dict[str, list[str]]:
    """Per task: main metric vs trainable parameters (log x) and vs peak memory, Pareto front marked. PNG."""
    try:
        import matplotlib
    except ImportError:
        print("peftkit bench: matplotlib is not installed (pip install 'peftkit[bench]'); skipping plots", file=sys.stderr)
        return {}
    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, list[str]] = {}
    for task in tasks:
        points = [r for r in rows if r["task"] == task and r["main_metric"] and r["trainable_params"]]
        if not points:
            continue
        metric = points[0]["main_metric"]
        drawn[task] = []
        for x_key, x_label, log_x, suffix, what in (
            ("trainable_params", "trainable parameters (log scale)", True, "params", "trainable parameters"),
            ("peak_memory_mb", _memory_label(points[0]["memory_kind"]), False, "memory", "peak training memory"),
        ):
            usable = [p for p in points if p[x_key] is not None]
            if usable:
                path = folder / f"{task}-{suffix}.png"
                _scatter(usable, x_key, x_label, log_x, metric, f"{task}: {metric} vs {what}", path)
                drawn[task].append(str(path))
    return drawn


def _memory_label(kind: str | None) -> str:
    return "peak CUDA memory allocated (MB)" if kind == "cuda_max_allocated" else "peak RSS above model baseline (MB)"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (lower x, higher y), in increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _scatter(points: list[dict[str, Any]], x_key: str, x_label: str, log_x: bool, metric: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    xs = [p[x_key] for p in points]
    ys = [100 * p[f"validation_{metric}_mean"] for p in points]
    errs = [100 * (p[f"validation_{metric}_std"] or 0.0) for p in points]
    front = pareto_front(list(zip(xs, ys)))
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    ax.errorbar(xs, ys, yerr=errs, fmt="o", color="tab:blue", ecolor="0.6", capsize=3, label="method (± std over seeds)")
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:red", alpha=0.6, drawstyle="steps-post")
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=140, facecolors="none", edgecolors="tab:red",
               label="Pareto front")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(p["method"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"validation {metric} (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
