"""Running the grid: each cell trained by `train()` in a fresh process (here, on Ray or on Slurm: executors.py),
measured, and written by this driver as one JSON file.

A fresh process per cell gives clean peak-memory numbers and means a crash (out of memory, a segfault) cannot take
the grid down. Resumable by construction: a cell with an ok result of the same config is skipped (delete its file to
rerun it; a result of another config stops the bench), a failed cell runs again, every file is written atomically,
and a failing cell is recorded as `failed` with its error while the others go on. One bench at a time per folder.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftkit.bench.executors import Executor, LocalExecutor
from peftkit.bench.grid import (
    Cell,
    CellJob,
    cell_job,
    cell_path,
    config_differences,
    plan_cells,
    read_cell,
    validate_choices,
)
from peftkit.bench.processes import folder_lock
from peftkit.bench.profiles import Profile, load_profile
from peftkit.bench.report import build_report
from peftkit.bench.selection import choose, grid_cells, seed_cells, write_selection
from peftkit.config import RunConfig
from peftkit.errors import PeftkitError, short_error, short_value
from peftkit.io import atomic_write_json
from peftkit.local_paths import absolute_local_path
from peftkit.loggers import read_metrics
from peftkit.measure import LoadMeter, machine_manifest
from peftkit.user_metrics import load_user_metrics, score_saved_adapter, unscored_modules


def run_bench(
    profile_name: str = "smoke",
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    out: str | Path | None = None,
    model: str | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    command: str | None = None,
    executor: Executor | None = None,
    user_metrics: list[str] | None = None,
) -> dict[str, int]:
    """Run every cell of the grid that has no ok result of the same config yet, then rebuild the report.

    `executor` decides where cells train (executors.py; default: one at a time in spawned processes here); this
    driver writes every cell file, atomically, as results arrive. Returns counts: planned cells, skipped (already
    had an ok result), ran now, retried (of those run now, the ones a failed result was there for), failed (in the
    whole grid). `user_metrics` (evaluate module specs) are loaded once here, before any cell trains, and each cell
    scores its kept model with them.
    """
    from peftkit.console import progress_bar

    profile = load_profile(profile_name)
    # absolute, as a run records it: each cell's config names it, and an executor may train in another folder
    data_dir = absolute_local_path("task.data_dir", data_dir)
    tasks = list(tasks or profile.tasks)
    methods = validate_choices(tasks, list(methods or profile.methods), data_dir)
    # loaded once here, before any cell trains (a typo costs seconds); cells get the specs, local paths made absolute
    loaded_metrics = load_user_metrics(user_metrics or ())
    metric_specs = tuple(m.spec for m in loaded_metrics)
    out = Path(out or f"benchmarks/results/{profile.name}")
    planned = plan_cells(profile, tasks, methods, seeds)
    if len({c.id for c in planned}) != len(planned):
        raise PeftkitError("two tasks share a name (folder/file stem); rename one so result files do not collide")
    # with a learning-rate grid: the grid first (first seed), then the other seeds at each chosen rate
    first_phase, chosen_later = grid_cells(planned, profile.lr_grid)
    check_planned_cells(first_phase, profile, out, model, data_dir)
    later_count = (
        len(planned) - len(first_phase) - len(chosen_later) + sum(len(profile.lr_grid[c.method]) for c in chosen_later)
    )
    manifest_base = {
        "profile": profile.name,
        "profile_description": profile.description,
        "command": command,
        **machine_manifest(),
    }
    with folder_lock(out):  # one bench per results folder: two would train into the same run folders
        done, retried = reusable_cells(first_phase, out, profile, model, data_dir)
        counts = {"planned": len(first_phase) + later_count, "skipped": len(done), "ran": 0, "retried": retried}
        bar = progress_bar(
            counts["planned"],
            counts["skipped"],
            progress,
            desc="bench",
            unit="cell",
            bar_format="{desc}: {n}/{total} cells |{bar}| [{elapsed}<{remaining}] {postfix}",
        )
        names = [m.name for m in loaded_metrics]
        lacking = [unscored_modules(read_cell(cell_path(out, c)).get("user_metrics"), names) for c in done if names]
        lacking = [modules for modules in lacking if modules]  # one list of unscored modules per such done cell
        if lacking:
            unscored = ", ".join(n for n in names if any(n in modules for modules in lacking))
            bar.write(
                f"peftkit bench: note: --metric scores only the cells run now; {len(lacking)} cells already done "
                f"have no {unscored} scores (their adapter weights are not kept): remove their cell files to run "
                "them again"
            )

        def write(cell: Cell, record: dict[str, Any]) -> None:
            atomic_write_json(cell_path(out, cell), record)
            counts["ran"] += 1
            if record["status"] == "failed":
                bar.write(f"peftkit bench: {cell.id} failed: {record['error'].splitlines()[0]}")
            bar.set_postfix_str(cell.id)
            bar.update(1)

        def run_cells(cells: list[Cell], done: list[Cell]) -> None:
            records, jobs = {}, []
            for cell in cells:
                if cell in done:
                    continue
                records[cell.id], job = prepare_cell(cell, profile, out, model, data_dir, manifest_base)
                if job is None:  # its config did not resolve: recorded as failed without running
                    write(cell, records.pop(cell.id))
                else:
                    jobs.append(replace(job, user_metrics=metric_specs))
            for job, outcome in (executor or LocalExecutor()).run(jobs):
                write(job.cell, finish_record(records.pop(job.cell.id), outcome))

        cells = list(first_phase)
        try:
            run_cells(first_phase, done)
            if chosen_later:
                choices = choose(out, chosen_later, profile.lr_grid)
                write_selection(out, choices, sorted({c.seed for c in planned}))
                later, unchosen = seed_cells(chosen_later, planned, choices)
                for first in unchosen:
                    bar.write(
                        f"peftkit bench: {first.task_label} {first.method}: every grid cell failed; no seeds run"
                    )
                done, retried = reusable_cells(later, out, profile, model, data_dir)
                counts["skipped"] += len(done)
                counts["retried"] += retried
                bar.update(len(done))
                run_cells(later, done)
                cells += later
        except BaseException:  # Ctrl-C, or the executor raising: the cells done get their tables all the same
            bar.close()
            report_cells_done(out, counts["planned"] - counts["skipped"] - counts["ran"])
            raise
        bar.close()
        build_report(out)
        counts["failed"] = sum(read_cell(cell_path(out, c))["status"] != "ok" for c in cells)  # this grid, any run
        return counts


def report_cells_done(out: Path, missing: int) -> None:
    """The report of a grid that stopped early, naming how many cells it lacks (else the cells on disk had no tables
    until a rerun or `--report`); a failure here is printed, not raised, so it cannot hide why the grid stopped."""
    if not any((out / "cells").glob("*.json")):
        return
    try:
        build_report(out, missing_cells=missing)
    except Exception as e:  # noqa: BLE001 - the error that stopped the grid is the one to raise
        print(f"peftkit bench: the tables of the cells done could not be written: {short_error(e)}", file=sys.stderr)
        return
    print(
        f"peftkit bench: stopped with {missing} planned cells missing; tables of the cells done: {out / 'results.md'}",
        file=sys.stderr,
    )


def check_planned_cells(
    cells: list[Cell], profile: Profile, out: Path, model: str | None, data_dir: str | None
) -> None:
    """Before anything trains: every cell's config resolves (a misspelt override in a profile failed every cell, one
    after another), and a learning-rate grid has a dev split to choose on (without `task.dev_size` no grid cell had a
    dev score, so every rate went unchosen and the grid's other seeds never ran, with exit 0)."""
    for cell in cells:
        try:
            config = cell_job(cell, profile, out, model, data_dir).config
        except PeftkitError as e:
            raise PeftkitError(f"bench profile {profile.name}, cell {cell.id}: {e}") from None
        if cell.lr is not None and config["task"]["dev_size"] is None:
            raise PeftkitError(
                f"bench profile {profile.name} gives {cell.method} an lr_grid, which is chosen on a dev split carved "
                f"from train, but task {cell.task_label} sets no task.dev_size: add e.g. task.dev_size=0.1 to the "
                "profile's overrides"
            )


def reusable_cells(
    cells: list[Cell], out: Path, profile: Profile, model: str | None, data_dir: str | None
) -> tuple[list[Cell], int]:
    """(the cells whose ok result counts as done, how many have a failed result): a failed cell runs again, as a
    failure may be transient. An ok result of another config (model, profile, data...) is refused, naming the keys
    that differ: counting it would put another grid's numbers in this grid's tables."""
    done, failed = [], 0
    for cell in cells:
        path = cell_path(out, cell)
        if not path.exists():
            continue
        record = read_cell(path)
        if record["status"] != "ok":
            failed += 1
            continue
        differences = config_differences(
            record["manifest"]["config"], cell_job(cell, profile, out, model, data_dir).config
        )
        if differences:
            shown = "; ".join(
                f"{k}: {short_value(a)} there, {short_value(b)} now" for k, (a, b) in list(differences.items())[:3]
            )
            more = f" (and {len(differences) - 3} more keys)" if len(differences) > 3 else ""
            raise PeftkitError(
                f"{path} was run with another config ({shown}{more}); give another --out, or remove {out} "
                f"to run this grid there"
            )
        done.append(cell)
    return done, failed


def prepare_cell(
    cell: Cell, profile: Profile, out: Path, model: str | None, data_dir: str | None, manifest_base: dict[str, Any]
) -> tuple[dict[str, Any], CellJob | None]:
    """The cell's record so far (a `failed` one until an outcome says otherwise) and its job, or None."""
    record: dict[str, Any] = {
        "cell": cell.id,
        "task": cell.task_label,
        "method": cell.method,
        "seed": cell.seed,
        "grid_lr": cell.lr,  # set for a cell of a learning-rate grid (selection.py)
        "status": "failed",
        "error": None,
    }
    manifest = {
        **manifest_base,
        "task_source": cell.task,
        "recipe": None,
        "overrides": None,
        "config": None,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    record["manifest"] = manifest
    try:
        job = cell_job(cell, profile, out, model, data_dir)
    except PeftkitError as e:
        record.update(error=f"PeftkitError: {e}", cell_seconds=0.0)
        return record, None
    manifest.update(recipe=job.config["recipe"], overrides=list(job.overrides), config=job.config)
    return record, job


def finish_record(record: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
    """Fold an executor's outcome into the record (manifest kept last, as in every cell file)."""
    manifest = record.pop("manifest")
    if outcome["kind"] == "ok":
        record.update(status="ok", **outcome["payload"])
    else:
        record["error"] = f"PeftkitError: {outcome['payload']}" if outcome["kind"] == "peftkit" else outcome["payload"]
    record["cell_seconds"] = outcome.get("seconds")
    record["manifest"] = manifest
    return record


def measure_cell(job: CellJob) -> dict[str, Any]:
    """Train through `train()`, time inference on the saved adapter, then drop the weights (the tables keep sizes)."""
    from peftkit.formats import AdapterMeta
    from peftkit.loop import train

    config = RunConfig.from_dict(job.config)
    load = LoadMeter()
    s = train(config, run_dir=job.run_dir)
    latency = inference_latency(job, config)
    other_cores = load.other_cores()
    task_metrics = AdapterMeta.read(job.run_dir / "adapter").task.metrics
    curve = [r for r in read_metrics(job.run_dir / "metrics.jsonl") if "split" in r]  # evaluations as it trained
    kept = {k: v for k, v in s.best.items() if k != "step"}
    user_metrics = score_saved_adapter(job.user_metrics, job.run_dir / "adapter", config) if job.user_metrics else None
    for heavy in ("adapter", "checkpoints"):  # keep config.yaml, metrics.jsonl, summary.json; weights can be MBs
        shutil.rmtree(job.run_dir / heavy, ignore_errors=True)
    on_cuda = s.memory_kind == "cuda_max_allocated"
    return {
        "task_metrics": task_metrics,  # the task's reported metrics, first = main (e.g. accuracy; mrpc adds f1)
        "validation": s.validation or kept,  # the kept weights on validation (never selected on with a dev split)
        "test": s.test,  # None where the task has no labelled test split
        "selection_split": s.selection_split,
        "dev": kept if s.selection_split == "dev" else None,  # what the best step and the learning rate chose by
        "lr": config.train.lr,
        "kept": s.kept,
        "kept_step": s.best["step"],
        "stopped_early": s.stopped_early,
        "final_validation": s.final,  # the last evaluation (on the selection split)
        "majority_rate": s.majority_rate,
        "curve": curve,
        "trainable_params": s.trainable_params,
        "total_params": s.total_params,
        "trainable_pct": s.trainable_pct,
        "adapter_bytes": s.adapter_bytes,
        # headline memory: CUDA max_memory_allocated, or on CPU the peak RSS above the loaded-model baseline
        "peak_memory_mb": s.peak_memory_mb if on_cuda else s.peak_memory_above_baseline_mb,
        "memory_kind": s.memory_kind,
        "process_peak_memory_mb": s.peak_memory_mb,
        "baseline_memory_mb": s.baseline_memory_mb,
        "model_state_mb": s.model_state_mb,
        "train_seconds": s.train_seconds,
        "train_examples_per_s": s.train_examples_per_s,
        "steps": s.steps,
        "examples_seen": s.examples_seen,
        "train_examples": s.train_examples,
        "validation_examples": s.validation_examples,
        "latency_ms_per_example": latency["ms_per_example"],
        "latency": latency,
        "device": s.device,
        "bf16": s.bf16,
        "environment": s.environment,
        "other_cores": other_cores,  # cores other processes used meanwhile: its times are a speed claim only near 0
        **({"user_metrics": user_metrics} if user_metrics is not None else {}),  # {"validation": {...}, "test": ...}
    }


def inference_latency(job: CellJob, config: RunConfig) -> dict[str, Any]:
    """Milliseconds per example to label validation rows with the saved adapter (one warm-up batch first)."""
    import torch

    from peftkit.artifacts import load
    from peftkit.data import encode, load_task
    from peftkit.inference import predict_logits
    from peftkit.modeling import resolve_device

    batch_size = job.latency_batch_size
    loaded = load(job.run_dir / "adapter", base=config.model.name_or_path)
    device = resolve_device(config.train.device)
    model = loaded.model.to(device)
    rows = load_task(config.task, seed=config.train.seed).split("validation")[: job.latency_examples]
    split = encode(rows, loaded.tokenizer, config.task.max_length)
    warmup = encode(rows[:batch_size], loaded.tokenizer, config.task.max_length)
    predict_logits(model, warmup, batch_size, device, config.train.bf16)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    predict_logits(model, split, batch_size, device, config.train.bf16)  # returns CPU tensors: synchronised
    seconds = time.perf_counter() - started
    return {
        "ms_per_example": round(1000 * seconds / max(len(split), 1), 3),
        "examples": len(split),
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "device": str(device),
        "bf16": config.train.bf16,
    }
