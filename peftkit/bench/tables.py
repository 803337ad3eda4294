"""The report's tables as (header, rows) of strings, so results.md (Markdown) and index.html (page.py) show the same
numbers from one place; plus results.md itself.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from peftkit.bench.plots import Plot, reference_lines
from peftkit.bench.report_user_metrics import user_metrics_section
from peftkit.measure import BUSY_CORES

Table = tuple[list[str], list[list[str]]]
METRIC_ORDER = ("accuracy", "macro_f1", "f1")
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
KEPT_HELP = (
    "the evaluation the run kept (best on validation for most methods, final for AdaLoRA), in %; "
    "test only where the task has a labelled test split"
)


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


def summary_table(report: dict[str, Any], tasks: list[str], methods: list[str]) -> Table:
    """Methods x tasks on the main validation metric, and the mean over tasks where a method has every task, named
    by its metric; no mean where the tasks' main metrics differ (an average of accuracy and F1 means nothing)."""
    metric = shared_main_metric(report, tasks)
    rows = []
    for m in methods:
        cells = [report["summary"][m].get(t) for t in tasks]
        values = [c["mean"] for c in cells if c and c["mean"] is not None]
        mean = statistics.fmean(values) if len(values) == len(tasks) else None
        row = [m, *(format_mean_std(c["mean"], c["std"]) if c else "-" for c in cells)]
        rows.append([*row, format_mean_std(mean, None)] if metric else row)
    return ["method", *tasks, *([f"mean {metric}"] if metric else [])], rows


def shared_main_metric(report: dict[str, Any], tasks: list[str]) -> str | None:
    """The main metric every task of the summary reports (None when they differ or none has a result)."""
    metrics = {c["metric"] for by_task in report["summary"].values() for t in tasks if (c := by_task.get(t))}
    return metrics.pop() if len(metrics) == 1 else None


def main_metrics_line(report: dict[str, Any], tasks: list[str]) -> str:
    rows = report["rows"]
    mains = {t: next((r["main_metric"] for r in rows if r["task"] == t and r["main_metric"]), "-") for t in tasks}
    mean = (
        "The mean column averages tasks only where a method has every task."
        if shared_main_metric(report, tasks)
        else "No mean column: the tasks' main metrics differ, and a mean over different metrics means nothing."
    )
    return "Main metric per task: " + ", ".join(f"{t}: {m}" for t, m in mains.items()) + ". " + mean


def budget_table(report: dict[str, Any]) -> Table:
    header = ["task", "train rows", "steps", "batch", "max length", "eval rows", "eval every", "bf16", "device"]
    rows = [
        [
            t,
            format_number(b["train_examples"], 0),
            str(b["steps"]),
            str(b["batch_size"] * b["grad_accum_steps"]),
            str(b["max_length"]),
            str(b["validation_examples"]),
            str(b["eval_every"] or "end"),
            "auto" if b["bf16"] is None else str(b["bf16"]),  # auto: bf16 only where it pays
            str(b["device"]),
        ]
        for t, b in report["budgets"].items()
    ]
    return header, rows


def task_table(task_rows: list[dict[str, Any]]) -> Table:
    """One task: every method's metrics (validation, and test where labelled) and cost columns."""
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
    rows = [
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
            *(busy_mark(r, format_number(r[k], d)) for k, d in TIMED_COLUMNS),
            f"{r['lr']:g}" if r["lr"] is not None else "-",
        ]
        for r in task_rows
    ]
    return header, rows


TIMED_COLUMNS = (("train_seconds", 1), ("train_examples_per_s", 1), ("latency_ms_per_example", 2))


def busy_mark(row: dict[str, Any], text: str) -> str:
    """A timing measured while other processes used the machine carries a `*` (see `busy_line`)."""
    return f"{text} *" if row.get("busy_seeds") else text


def busy_line(task_rows: list[dict[str, Any]]) -> str | None:
    """Which rows' times were measured on a busy machine, in words (None when every timed seed ran alone)."""
    busy = [f"{r['method']} {r['busy_seeds']} of {r['ok']}" for r in task_rows if r.get("busy_seeds")]
    if not busy:
        return None
    return (
        f"* Timed while other processes kept at least {BUSY_CORES} core busy on average (seeds: {', '.join(busy)}): "
        "these times and rates are not speed claims; benchmarks/speed.py makes those."
    )


def task_notes(task_rows: list[dict[str, Any]]) -> list[str]:
    """The lines under a task's table: the scores to beat, which times a busy machine measured, and on which
    machines the rows were timed when they were not all timed on one."""
    lines = (references_line(task_rows), busy_line(task_rows), machines_line(task_rows))
    return [line for line in lines if line]


def machines_line(task_rows: list[dict[str, Any]]) -> str | None:
    """Which machine timed which rows, in words (None when one machine timed them all)."""
    by_machine: dict[str, list[str]] = {}
    for r in task_rows:
        for machine in r.get("machines") or []:
            by_machine.setdefault(machine, []).append(r["method"])
    if len(by_machine) < 2:
        return None
    timed = "; ".join(f"{machine}: {', '.join(methods)}" for machine, methods in sorted(by_machine.items()))
    return f"Timed on more than one machine ({timed}): compare times only between rows of one machine."


def references_line(task_rows: list[dict[str, Any]]) -> str | None:
    """The scores a method must beat, in words (None when the cells carry neither)."""
    refs = reference_lines(task_rows)
    if not refs:
        return None
    return (
        "Reference lines (validation %): "
        + ", ".join(f"{name} {format_mean_std(v, None)}" for name, v in refs.items())
        + "."
    )


def selection_table(selection: dict[str, Any]) -> Table:
    """Per task and method, the chosen learning rate and the dev main metric (%) at every learning rate tried."""
    tried = {lr for methods in selection["tasks"].values() for m in methods.values() for lr in m.get("dev", {})}
    lrs = sorted(tried, key=float)
    rows = [
        [
            task,
            method,
            f"{float(m['chosen_lr']):g}" if m.get("chosen_lr") is not None else "-",
            *(format_mean_std(m.get("dev", {}).get(lr), None) for lr in lrs),
        ]
        for task, methods in selection["tasks"].items()
        for method, m in methods.items()
    ]
    return ["task", "method", "chosen lr", *(f"dev @ {float(lr):g}" for lr in lrs)], rows


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    aligns = ["---" if i == 0 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(map(str, r)) + " |" for r in (header, aligns, *rows)]


def machine_line(env: dict[str, Any]) -> str:
    machines = env.get("machines") or {}
    if len(machines) > 1:
        counted = ", ".join(f"{m} ({n} cells)" for m, n in sorted(machines.items()))
        return (
            f"Machines: {counted}, {env.get('cpu_count')} cores each (as the first cell recorded); torch "
            f"{env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}, peftkit "
            f"{env.get('peftkit')}; the cells' manifests hold each one's machine and git commit."
        )
    return (
        f"Machine: {env.get('cpu_model')} ({env.get('cpu_count')} cores, torch threads "
        f"{env.get('torch_threads')}), GPU: {env.get('gpu') or 'none'}; torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, peft {env.get('peft')}, peftkit {env.get('peftkit')}; "
        f"git {env.get('git_commit') or 'unknown'}{' (uncommitted changes)' if env.get('git_dirty') else ''}."
    )


def missing_line(report: dict[str, Any]) -> str | None:
    """What a grid that stopped early lacks, in words (None for a grid that ran to its end)."""
    missing = report.get("missing_cells")
    if not missing:
        return None
    return (
        f"Incomplete: the bench stopped before its end, so {missing} planned cells have no result and are in no "
        "table or mean below; running the same bench command again runs them (the cells done are kept)."
    )


COMMANDS_HEADING = "Commands (one per sitting; each cell's manifest names its own):"


def command_lines(env: dict[str, Any]) -> list[str]:
    """The command(s) that made the cells: one line, or one per sitting with its cell count."""
    commands = env.get("commands") or []
    if len(commands) == 1:
        return [f"Command: `{commands[0]['command']}`"]
    return [COMMANDS_HEADING] + [f"- `{c['command']}` ({c['cells']} cells)" for c in commands]


def to_markdown(
    report: dict[str, Any], tasks: list[str], methods: list[str], plots: dict[str, list[Plot]], out: Path
) -> str:
    rows, env = report["rows"], report["environment"]
    lines = [f"# peftkit bench results ({', '.join(report['profiles'])} profile)", ""]
    lines += [*command_lines(env), ""]
    lines += [f"{machine_line(env)} Generated {report['generated_at']}.", ""]
    lines += [f"**{missing_line(report)}**", ""] if missing_line(report) else []
    if report.get("protocol"):
        lines += ["## Protocol", "", report["protocol"], ""]

    lines += ["## Summary: main validation metric (%), mean ± std over seeds", ""]
    lines += markdown_table(*summary_table(report, tasks, methods))
    lines += ["", main_metrics_line(report, tasks), ""]
    lines += ["## Budgets", "", *markdown_table(*budget_table(report)), ""]
    if report.get("selection"):
        lines += ["## Learning-rate selection", "", *markdown_table(*selection_table(report["selection"])), ""]

    for task in tasks:
        lines += task_section(task, [r for r in rows if r["task"] == task], plots.get(task, []), out)
    lines += user_metrics_section(rows)

    failed = [c for c in report["cells"] if c["status"] != "ok"]
    if failed:
        lines += ["## Failed cells", "", "Running the same bench command again runs these cells again.", ""]
        lines += [f"- `{c['cell']}`: {c['error'].splitlines()[0]}" for c in failed] + [""]
    lines += ["## Columns", ""] + [f"- **{k}**: {v}" for k, v in COLUMN_HELP.items()]
    lines += [f"- **val/test metric**: {KEPT_HELP}", ""]
    return "\n".join(lines)


def task_section(task: str, task_rows: list[dict[str, Any]], plots: list[Plot], out: Path) -> list[str]:
    """One task's table, its reference scores, then its plots, each with its caption."""
    lines = [f"## {task}", "", *markdown_table(*task_table(task_rows)), ""]
    for note in task_notes(task_rows):
        lines += [note, ""]
    for p in plots:
        lines += [
            f"![{task}: {Path(p.path).stem}]({Path(p.path).relative_to(out).as_posix()})",
            "",
            f"*{p.caption}*",
            "",
        ]
    return lines
