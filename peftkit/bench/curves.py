"""Training curves: per task, the main metric against wall-clock training time and against examples seen, one line
per method, from each cell's `curve` (its evaluations during training). End points say who won; curves say whether
a method was still climbing when the budget ran out, and how fast it got there.

Cells written before `curve` existed are skipped. `mean_curve` and `curve_split` are plain Python.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from peftkit.bench.plots import (
    Plot,
    draw_references,
    padded_limits,
    reference_caption,
    reference_lines,
    save_figure,
)
from peftkit.bench.profiles import canonical_method

X_AXES = (  # (record key, axis label, file suffix, words for the title)
    ("train_seconds", "training wall time (s)", "curve-time", "training time"),
    ("examples_seen", "training examples seen", "curve-examples", "examples seen"),
)


def draw_curves(
    task: str,
    task_rows: list[dict[str, Any]],
    cells: list[dict[str, Any]],
    colors: dict[str, tuple[str, str]],
    folder: Path,
) -> list[Plot]:
    """`<task>-curve-time.png` and `<task>-curve-examples.png`, or nothing when no cell of the task has a curve."""
    metric = next((r["main_metric"] for r in task_rows if r["main_metric"]), None)
    with_curve = [c for c in cells if c["task"] == task and c["status"] == "ok" and c.get("curve")]
    if metric is None or not with_curve:
        return []
    split = curve_split(with_curve, metric)
    curves = {}
    for method in colors:
        curve = mean_curve([c for c in with_curve if canonical_method(c["method"]) == method], split, metric)
        if curve:
            curves[method] = curve
    if not curves:
        return []
    refs = reference_lines(task_rows) if split == "validation" else {}  # the references are validation scores
    caption = (
        f"{split.capitalize()} {metric} (%) at each evaluation during training, one line per method: the mean over "
        "the method's seeds, at the steps every seed evaluated" + reference_caption(refs)
    )
    plots = []
    for x_key, x_label, suffix, words in X_AXES:
        path = folder / f"{task}-{suffix}.png"
        title = f"{task}: {split} {metric} vs {words} (mean over seeds)"
        curve_plot(curves, x_key, x_label, metric, split, title, refs, colors, path)
        plots.append(Plot(str(path), caption))
    return plots


def curve_split(cells: list[dict[str, Any]], metric: str) -> str:
    """The split most of the task's curve records evaluate (`validation` on a tie), so every line means the same."""
    counts = Counter(r.get("split", "validation") for c in cells for r in c["curve"] if r.get(metric) is not None)
    return max(sorted(counts), key=lambda s: (counts[s], s == "validation"))


def mean_curve(method_cells: list[dict[str, Any]], split: str, metric: str) -> list[dict[str, float]]:
    """One method's curve on `split`, averaged over its seeds at the steps every seed evaluated, in step order."""
    per_seed = []
    for cell in method_cells:
        by_step = {r["step"]: r for r in cell["curve"] if r.get("split") == split and r.get(metric) is not None}
        if by_step:
            per_seed.append(by_step)
    if not per_seed:
        return []
    shared = set.intersection(*(set(s) for s in per_seed))
    return [
        {
            "step": step,
            **{k: statistics.fmean(s[step][k] for s in per_seed) for k in ("examples_seen", "train_seconds", metric)},
        }
        for step in sorted(shared)
    ]


def curve_plot(
    curves: dict[str, list[dict[str, float]]],
    x_key: str,
    x_label: str,
    metric: str,
    split: str,
    title: str,
    refs: dict[str, float],
    colors: dict[str, tuple[str, str]],
    path: Path,
) -> None:
    """One PNG: a line with markers per method, the legend to the right of the axes so it covers no line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.8), dpi=110, layout="constrained")
    for method, curve in curves.items():
        color, marker = colors[method]
        xs, ys = [p[x_key] for p in curve], [100 * p[metric] for p in curve]
        ax.plot(xs, ys, marker=marker, ms=4, lw=1.4, color=color, label=method, clip_on=False)
    all_x = [p[x_key] for curve in curves.values() for p in curve]
    all_y = [100 * p[metric] for curve in curves.values() for p in curve]
    all_y += draw_references(ax, refs, all_y)
    ax.set_xlim(*padded_limits([0.0, *all_x], low=0.02, high=0.04))
    ax.set_ylim(*padded_limits(all_y, low=0.06, high=0.08))
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{split} {metric} (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    save_figure(fig, path)
