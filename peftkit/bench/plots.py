"""Plots for the report: per task, the main metric against trainable parameters and against peak memory.

Kept apart because matplotlib is an optional extra (`peftkit[bench]`): without it the tables are still written and
the plots are skipped with one line on stderr. `pareto_front` is plain Python and needs no matplotlib.
"""

from __future__ import annotations

import io
import math
import os
import sys
from pathlib import Path
from typing import Any


def draw_plots(rows: list[dict[str, Any]], tasks: list[str], folder: Path) -> dict[str, list[str]]:
    """Per task: main metric vs trainable parameters (log x) and vs peak memory, Pareto front marked. PNG."""
    try:
        import matplotlib
    except ImportError:
        print(
            "peftkit bench: matplotlib is not installed (pip install 'peftkit[bench]'); skipping plots",
            file=sys.stderr,
        )
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
            ("peak_memory_mb", memory_axis_label(points[0]["memory_kind"]), False, "memory", "peak training memory"),
        ):
            usable = [p for p in points if p[x_key] is not None]
            if usable:
                path = folder / f"{task}-{suffix}.png"
                scatter_plot(usable, x_key, x_label, log_x, metric, f"{task}: {metric} vs {what}", path)
                drawn[task].append(str(path))
    return drawn


def memory_axis_label(kind: str | None) -> str:
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


def scatter_plot(
    points: list[dict[str, Any]], x_key: str, x_label: str, log_x: bool, metric: str, title: str, path: Path
) -> None:
    """One PNG: methods with ± std error bars, the Pareto front as a red step line; written atomically."""
    import matplotlib.pyplot as plt

    xs = [p[x_key] for p in points]
    ys = [100 * p[f"validation_{metric}_mean"] for p in points]
    errs = [100 * (p[f"validation_{metric}_std"] or 0.0) for p in points]
    front = pareto_front(list(zip(xs, ys)))
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    ax.errorbar(
        xs, ys, yerr=errs, fmt="o", color="tab:blue", ecolor="0.6", capsize=3, label="method (± std over seeds)"
    )
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:red", alpha=0.6, drawstyle="steps-post")
    ax.scatter(
        [xs[i] for i in front],
        [ys[i] for i in front],
        s=140,
        facecolors="none",
        edgecolors="tab:red",
        label="Pareto front",
    )
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
