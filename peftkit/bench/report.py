"""The report: OUT/cells/*.json alone -> results.json, results.csv, results.md (and plots/ through plots.py).

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

from peftkit.bench.plots import draw_plots
from peftkit.bench.profiles import all_methods, all_tasks, canonical_method
from peftkit.bench.report_user_metrics import user_metric_columns, user_metric_means, user_metrics_section
from peftkit.bench.selection import read_selection, reported_cells
from peftkit.errors import PeftkitError
from peftkit.io import atomic_write_json, atomic_write_text, read_json

METRIC_ORDER = ("accuracy", "macro_f1", "f1")
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
COLUMN_HELP = {
    "method": "adaptation method (recipe <task>-<method>)",
    "seeds": "successful seeds / cells run",
    "trainable %": "trainable parameters (task head included) as % of all parameters in the trained model",
    "adapter MB": "size on disk of the saved weights (safetensors); full fine-tuning saves the whole model",
    "peak mem MB": "CPU: process peak RSS during training above the RSS after loading the model; "
    "CUDA: max_memory_allocated",
    "state MB": "tensor memory of weights + gradients + AdamW moments of trainable parameters (analytic)",
    "train s": "training wall time (excludes data loading and final evaluation)",
    "ex/s": "training examples per second",
    "latency ms": "inference milliseconds per validation example at the profile's batch size, "
    "adapter loaded from disk",
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
    cells = reported_cells(load_cells(out), read_selection(out))  # a grid's cells at the chosen learning rate only
    rows = aggregate(cells)
    tasks = in_canonical_order({r["task"] for r in rows}, all_tasks())
    methods = in_canonical_order({r["method"] for r in rows}, all_methods())
    report = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profiles": sorted({c["manifest"]["profile"] for c in cells}),
        "environment": environment_summary(cells),
        "budgets": budgets(cells),
        "summary": {m: {t: main_metric_summary(rows, t, m) for t in tasks} for m in methods},
        "rows": rows,
        "cells": [{**{k: c.get(k) for k in CELL_KEYS}, "method": canonical_method(c["method"])} for c in cells],
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
            "eval_every": tr["eval_every"],
            "bf16": tr["bf16"],
            "device": c["device"],
        }
    return out


def environment_summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The machine and library versions of the first successful cell (all cells of a grid share one machine)."""
    ok = [c for c in cells if c["status"] == "ok"] or cells
    first = ok[0]
    keys = ("git_commit", "git_dirty", "cpu_model", "cpu_count", "platform", "command")
    return {**(first.get("environment") or {}), **{k: first["manifest"].get(k) for k in keys}}


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns = ["task", "method", "cells", "ok", "seeds", "main_metric"]
    columns += [f"{s}_{m}_{a}" for s in ("validation", "test") for m in METRIC_ORDER for a in ("mean", "std")]
    columns += [*NUMERIC_COLUMNS, "memory_kind", "steps", "lr", "errors", *user_metric_columns(rows)]
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


def format_mean_std(mean: float | None, std: float | None) -> str:
    """A metric as a percentage, `mean ± std` over seeds (no std for one seed)."""
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def format_number(value: float | None, digits: int = 1) -> str:
    """A cost column: `digits` decimals, or thousands separators and no decimals from 1000 up."""
    if value is None:
        return "-"
    if digits == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def to_markdown(
    report: dict[str, Any], tasks: list[str], methods: list[str], plots: dict[str, list[str]], out: Path
) -> str:
    rows, env = report["rows"], report["environment"]
    lines = [f"# peftkit bench results ({', '.join(report['profiles'])} profile)", ""]
    if env.get("command"):
        lines += [f"Command: `{env['command']}`", ""]
    lines += [
        f"Machine: {env.get('cpu_model')} ({env.get('cpu_count')} cores, torch threads "
        f"{env.get('torch_threads')}), GPU: {env.get('gpu') or 'none'}; torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, peft {env.get('peft')}, peftkit {env.get('peftkit')}; "
        f"git {env.get('git_commit') or 'unknown'}{' (uncommitted changes)' if env.get('git_dirty') else ''}. "
        f"Generated {report['generated_at']}.",
        "",
    ]

    lines += ["## Summary: main validation metric (%), mean ± std over seeds", ""]
    table = []
    for m in methods:
        cells = [report["summary"][m].get(t) for t in tasks]
        values = [c["mean"] for c in cells if c and c["mean"] is not None]
        mean = statistics.fmean(values) if len(values) == len(tasks) else None
        table.append(
            [m, *(format_mean_std(c["mean"], c["std"]) if c else "-" for c in cells), format_mean_std(mean, None)]
        )
    lines += markdown_table(["method", *tasks, "mean"], table)
    mains = {t: next((r["main_metric"] for r in rows if r["task"] == t and r["main_metric"]), "-") for t in tasks}
    lines += [
        "",
        "Main metric per task: "
        + ", ".join(f"{t}: {m}" for t, m in mains.items())
        + ". The mean column averages tasks only where a method has every task.",
        "",
    ]

    lines += ["## Budgets", ""]
    header = ["task", "train rows", "steps", "batch", "max length", "eval rows", "eval every", "bf16", "device"]
    table = [
        [
            t,
            format_number(b["train_examples"], 0),
            b["steps"],
            b["batch_size"] * b["grad_accum_steps"],
            b["max_length"],
            b["validation_examples"],
            b["eval_every"] or "end",
            b["bf16"],
            b["device"],
        ]
        for t, b in report["budgets"].items()
    ]
    lines += markdown_table(header, table) + [""]

    for task in tasks:
        lines += task_section(task, [r for r in rows if r["task"] == task], plots.get(task, []), out)
    lines += user_metrics_section(rows)

    failed = [c for c in report["cells"] if c["status"] != "ok"]
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- `{c['cell']}`: {c['error'].splitlines()[0]}" for c in failed] + [""]
    lines += ["## Columns", ""] + [f"- **{k}**: {v}" for k, v in COLUMN_HELP.items()]
    lines += [
        "- **val/test metric**: the evaluation the run kept (best on validation for most methods, final for "
        "AdaLoRA), in %; test only where the task has a labelled test split",
        "",
    ]
    return "\n".join(lines)


def task_section(task: str, task_rows: list[dict[str, Any]], plots: list[str], out: Path) -> list[str]:
    """One task's table: every method's metrics (validation, and test where labelled) and cost columns, then plots."""
    metrics = [m for m in METRIC_ORDER if any(r[f"validation_{m}_mean"] is not None for r in task_rows)]
    has_test = any(r[f"test_{m}_mean"] is not None for r in task_rows for m in metrics)
    header = [
        "method",
        "seeds",
        *(f"val {m}" for m in metrics),
        *(f"test {m}" for m in metrics if has_test),
        "trainable %",
        "trainable",
        "adapter MB",
        "peak mem MB",
        "state MB",
        "train s",
        "ex/s",
        "latency ms",
        "lr",
    ]
    table = []
    for r in task_rows:
        table.append(
            [
                r["method"],
                f"{r['ok']}/{r['cells']}",
                *(format_mean_std(r[f"validation_{m}_mean"], r[f"validation_{m}_std"]) for m in metrics),
                *(format_mean_std(r[f"test_{m}_mean"], r[f"test_{m}_std"]) for m in metrics if has_test),
                format_number(r["trainable_pct"], 3),
                format_number(r["trainable_params"], 0),
                format_number(r["adapter_mb"], 2),
                format_number(r["peak_memory_mb"], 0),
                format_number(r["model_state_mb"], 0),
                format_number(r["train_seconds"]),
                format_number(r["train_examples_per_s"]),
                format_number(r["latency_ms_per_example"], 2),
                f"{r['lr']:g}" if r["lr"] is not None else "-",
            ]
        )
    lines = [f"## {task}", "", *markdown_table(header, table), ""]
    lines += [f"![{task}: {Path(p).stem}]({Path(p).relative_to(out).as_posix()})" for p in plots]
    return lines + [""]


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    aligns = ["---" if i == 0 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(map(str, r)) + " |" for r in (header, aligns, *rows)]
