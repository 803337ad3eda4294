"""The report: OUT/cells/*.json alone -> results.json, results.csv, results.md, index.html (page.py) and plots/
(plots.py); tables.py renders the tables.

The cell files are the only source of truth, so `peftkit bench --report DIR` rebuilds every table on any machine,
and cell files written before a rename still count: a method's old name (`adapter`) is read as its current one.
"""

from __future__ import annotations

import csv
import io
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftkit.bench.grid import read_cell
from peftkit.bench.page import write_page
from peftkit.bench.plots import draw_plots
from peftkit.bench.profiles import all_methods, all_tasks, canonical_method
from peftkit.bench.report_user_metrics import user_metric_columns, user_metric_means
from peftkit.bench.selection import read_selection, reported_cells
from peftkit.bench.tables import METRIC_ORDER, to_markdown
from peftkit.errors import PeftkitError
from peftkit.io import atomic_write_json, atomic_write_text, read_json
from peftkit.measure import BUSY_CORES

NUMERIC_COLUMNS = (
    "trainable_params",
    "trainable_pct",
    "adapter_mb",
    "peak_memory_mb",
    "model_state_mb",
    "train_seconds",
    "train_examples_per_s",
    "latency_ms_per_example",
)
CELL_KEYS = ("cell", "task", "method", "seed", "status", "error", "validation", "test")  # results.json's cell list


def load_cells(out: str | Path) -> list[dict[str, Any]]:
    folder = Path(out) / "cells"
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise PeftkitError(f"no cell results in {folder}; run `peftkit bench --out {out}` first")
    return [read_cell(f) for f in files]


def build_report(out: str | Path, missing_cells: int = 0) -> dict[str, Any]:
    """Rebuild results.json, results.csv, results.md, index.html and plots/ from OUT/cells/*.json alone
    (plus OUT/selection.json, the learning-rate selection, where one was written). `missing_cells`: how many planned
    cells a grid that stopped early lacks (the runner knows the plan; the cell files alone do not)."""
    out = Path(out)
    every_run = load_cells(out)
    cells = reported_cells(every_run, read_selection(out))  # a grid's cells at the chosen learning rate only
    rows = aggregate(cells)
    tasks = in_canonical_order({r["task"] for r in rows}, all_tasks())
    methods = in_canonical_order({r["method"] for r in rows}, all_methods())
    selection = load_selection(out)
    report = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profiles": sorted({c["manifest"]["profile"] for c in cells}),
        "protocol": protocol_text(cells, selection),
        "environment": environment_summary(every_run),  # commands and machines count every run, grid included
        "missing_cells": missing_cells,
        "budgets": budgets(cells),
        "summary": {m: {t: main_metric_summary(rows, t, m) for t in tasks} for m in methods},
        "selection": selection,
        "rows": rows,
        "cells": [{**{k: c.get(k) for k in CELL_KEYS}, "method": canonical_method(c["method"])} for c in cells],
    }
    atomic_write_json(out / "results.json", report)
    atomic_write_text(out / "results.csv", to_csv(rows))
    plots = draw_plots(rows, cells, tasks, out / "plots")
    atomic_write_text(out / "results.md", to_markdown(report, tasks, methods, plots, out))
    write_page(out / "index.html", report, tasks, methods, plots, cells)
    return report


def load_selection(out: Path) -> dict[str, Any] | None:
    """OUT/selection.json: the learning rate each (task, method) kept and the dev score of every one tried."""
    path = out / "selection.json"
    return read_json(path) if path.is_file() else None


def protocol_text(cells: list[dict[str, Any]], selection: dict[str, Any] | None) -> str:
    """How the numbers were made, in words: the profiles' descriptions, then the selection protocol if any."""
    parts = sorted({c["manifest"].get("profile_description") or "" for c in cells} - {""})
    if selection and selection.get("protocol"):
        parts.append(selection["protocol"])
    return "\n\n".join(parts)


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method): metric mean/std over the ok seeds, cost columns averaged over them."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["task"], canonical_method(c["method"])), []).append(c)
    rows = []
    for (task, method), group in groups.items():
        ok = [c for c in group if c["status"] == "ok"]
        row: dict[str, Any] = {
            "task": task,
            "method": method,
            "cells": len(group),
            "ok": len(ok),
            "seeds": sorted(c["seed"] for c in ok),
            "main_metric": ok[0]["task_metrics"][0] if ok else None,
            "errors": sorted({c["error"].splitlines()[0] for c in group if c["status"] != "ok"}),
        }
        for split in ("validation", "test"):
            for metric in METRIC_ORDER:
                values = [c[split][metric] for c in ok if c.get(split) and metric in c["task_metrics"]]
                row[f"{split}_{metric}_mean"], row[f"{split}_{metric}_std"] = mean_and_std(values)
        row.update(user_metric_means(ok))  # `peftkit bench --metric` columns, if any
        for column in NUMERIC_COLUMNS:
            source = "adapter_bytes" if column == "adapter_mb" else column
            values = [c[source] for c in ok if c.get(source) is not None]
            mean = statistics.fmean(values) if values else None
            row[column] = None if mean is None else (mean / 2**20 if column == "adapter_mb" else mean)
        rates = [c["majority_rate"] for c in ok if c.get("majority_rate") is not None]  # absent in old cells
        row["majority_rate"] = statistics.fmean(rates) if rates else None
        row["busy_seeds"] = sum((c.get("other_cores") or 0) >= BUSY_CORES for c in ok)  # absent in old cells: 0
        row["machines"] = sorted({c["manifest"].get("cpu_model") or "unknown" for c in ok})
        row["memory_kind"] = ok[0]["memory_kind"] if ok else None
        row["steps"] = ok[0]["steps"] if ok else None
        row["lr"] = ok[0]["manifest"]["config"]["train"]["lr"] if ok else None
        rows.append(row)
    order = {m: i for i, m in enumerate(all_methods())}
    return sorted(rows, key=lambda r: (task_rank(r["task"]), order.get(r["method"], len(order)), r["method"]))


def mean_and_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation; no std for a single value, neither for none."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def task_rank(task: str) -> tuple[int, str]:
    """Built-in tasks in the task table's order, then the user's tasks by name."""
    known = all_tasks()
    return (known.index(task) if task in known else len(known), task)


def in_canonical_order(names: set[str], canonical: tuple[str, ...]) -> list[str]:
    return [n for n in canonical if n in names] + sorted(names - set(canonical))


def main_metric_summary(rows: list[dict[str, Any]], task: str, method: str) -> dict[str, Any] | None:
    """The summary table's cell: the task's main validation metric for one method, mean and std over seeds."""
    for r in rows:
        if r["task"] == task and r["method"] == method and r["main_metric"]:
            m = r["main_metric"]
            return {
                "metric": m,
                "mean": r[f"validation_{m}_mean"],
                "std": r[f"validation_{m}_std"],
                "seeds": len(r["seeds"]),
            }
    return None


def budgets(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task, the budget the cells actually ran with (read from their resolved configs)."""
    out: dict[str, dict[str, Any]] = {}
    for c in sorted(cells, key=lambda c: task_rank(c["task"])):
        config = c["manifest"].get("config")
        if c["status"] != "ok" or not config or c["task"] in out:
            continue
        t, tr = config["task"], config["train"]
        out[c["task"]] = {
            "profile": c["manifest"]["profile"],
            "max_train_examples": t["max_train_examples"],
            "train_examples": c["train_examples"],
            "max_steps": tr["max_steps"],
            "epochs": tr["epochs"],
            "steps": c["steps"],
            "batch_size": tr["batch_size"],
            "grad_accum_steps": tr["grad_accum_steps"],
            "max_length": t["max_length"],
            "max_eval_examples": t["max_eval_examples"],
            "validation_examples": c["validation_examples"],
            "eval_every": tr["eval_every"] or ("epoch" if tr.get("patience") else None),  # early stopping: each epoch
            "bf16": tr["bf16"],
            "device": c["device"],
        }
    return out


def environment_summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The library versions of the first successful cell, and every machine and command that ran cells (a grid run
    in sittings may span machines: `machines` counts the cells of each). Given every run, the grid's other learning
    rates included, so `cell_files` is the number of runs on disk."""
    ok = [c for c in cells if c["status"] == "ok"] or cells
    first = ok[0]
    machines: dict[str, int] = {}
    for cell in ok:
        machine = cell["manifest"].get("cpu_model") or "unknown"
        machines[machine] = machines.get(machine, 0) + 1
    keys = ("git_commit", "git_dirty", "cpu_model", "cpu_count", "platform")
    commands: dict[str, int] = {}  # a grid run in sittings has one command per sitting: each, with its cell count
    for cell in cells:
        command = cell["manifest"].get("command")
        if command:
            commands[command] = commands.get(command, 0) + 1
    return {
        **(first.get("environment") or {}),
        **{k: first["manifest"].get(k) for k in keys},
        "commands": [{"command": c, "cells": n} for c, n in commands.items()],
        "machines": machines,
        "cell_files": len(cells),
    }


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns = ["task", "method", "cells", "ok", "seeds", "main_metric"]
    columns += [f"{s}_{m}_{a}" for s in ("validation", "test") for m in METRIC_ORDER for a in ("mean", "std")]
    columns += [*NUMERIC_COLUMNS, "busy_seeds", "majority_rate", "memory_kind", "steps", "lr", "errors"]
    columns += user_metric_columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                **{k: r.get(k) for k in columns},
                "seeds": " ".join(map(str, r["seeds"])),
                "errors": " | ".join(r["errors"]),
            }
        )
    return buffer.getvalue()
