"""Plots for the report: per task, the main metric against trainable parameters and against peak memory, with the
`head` probe and the majority class as reference lines; and (curves.py) the metric during training.

Kept apart because matplotlib is an optional extra (`peftkit[bench]`): without it the tables are still written and
the plots are skipped with one line on stderr. `pareto_front` and `reference_lines` are plain Python.
Every figure keeps its legend outside the axes and pads its limits, so no point or label is hidden or cut off.
"""

from __future__ import annotations

import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEAD_PROBE = "head probe"
MAJORITY = "majority class"
LABEL_STYLE = {  # a light backing keeps a name legible where it crosses a marker or a line
    "textcoords": "offset points",
    "fontsize": 8,
    "bbox": {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
}
REFERENCE_STYLE = {HEAD_PROBE: {"color": "tab:green", "ls": "--"}, MAJORITY: {"color": "0.35", "ls": ":"}}
MARKER_PX = 5.0  # half the width of a method's marker on screen, for keeping labels off it
REFERENCE_WORDS = {HEAD_PROBE: "dashed green", MAJORITY: "dotted grey"}  # for captions


@dataclass(frozen=True)
class Plot:
    """A written PNG and the sentence that tells a reader what it shows."""

    path: str
    caption: str


def draw_plots(
    rows: list[dict[str, Any]], cells: list[dict[str, Any]], tasks: list[str], folder: Path
) -> dict[str, list[Plot]]:
    """Per task: main metric vs trainable parameters (log x) and vs peak memory, then the training curves. PNG."""
    try:
        import matplotlib
    except ImportError:
        print(
            "peftkit bench: matplotlib is not installed (pip install 'peftkit[bench]'); skipping plots",
            file=sys.stderr,
        )
        return {}
    matplotlib.use("Agg")
    from peftkit.bench.curves import draw_curves

    folder.mkdir(parents=True, exist_ok=True)
    colors = method_colors(list(dict.fromkeys(r["method"] for r in rows)))
    drawn: dict[str, list[Plot]] = {}
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        drawn[task] = draw_scatters(task, task_rows, folder) + draw_curves(task, task_rows, cells, colors, folder)
    return {task: plots for task, plots in drawn.items() if plots}


def draw_scatters(task: str, task_rows: list[dict[str, Any]], folder: Path) -> list[Plot]:
    """The cost trade-off end points: `<task>-params.png` and `<task>-memory.png` (where cells recorded memory)."""
    points = [r for r in task_rows if r["main_metric"] and r["trainable_params"]]
    if not points:
        return []
    metric = points[0]["main_metric"]
    refs = reference_lines(task_rows)
    plots = []
    for x_key, x_label, log_x, suffix, what in (
        ("trainable_params", "trainable parameters (log scale)", True, "params", "trainable parameters"),
        ("peak_memory_mb", memory_axis_label(points[0]["memory_kind"]), False, "memory", "peak training memory"),
    ):
        usable = [p for p in points if p[x_key] is not None]
        if usable:
            path = folder / f"{task}-{suffix}.png"
            scatter_plot(usable, x_key, x_label, log_x, metric, f"{task}: {metric} vs {what}", refs, path)
            caption = f"Validation {metric} (%) against {what}, mean ± std over seeds; red: the Pareto front"
            plots.append(Plot(str(path), caption + reference_caption(refs)))
    return plots


def reference_caption(refs: dict[str, float]) -> str:
    if not refs:
        return "."
    return "; " + ", ".join(f"{REFERENCE_WORDS[name]} line: {name}" for name in refs) + "."


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


def reference_lines(task_rows: list[dict[str, Any]]) -> dict[str, float]:
    """The scores a method must beat on one task (fractions, validation): the `head` method's main metric (mean over
    seeds; only the pooling head and classifier train) and, for accuracy, the majority-class rate. Each only where
    the cells carry it: cells written before `majority_rate` existed draw no majority line."""
    refs: dict[str, float] = {}
    head = next((r for r in task_rows if r["method"] == "head" and r["main_metric"]), None)
    if head and head[f"validation_{head['main_metric']}_mean"] is not None:
        refs[HEAD_PROBE] = head[f"validation_{head['main_metric']}_mean"]
    metric = next((r["main_metric"] for r in task_rows if r["main_metric"]), None)
    rates = [r["majority_rate"] for r in task_rows if r.get("majority_rate") is not None]
    if metric == "accuracy" and rates:  # the majority class's score is its rate only when the metric is accuracy
        refs[MAJORITY] = sum(rates) / len(rates)
    return refs


def draw_references(ax: Any, refs: dict[str, float], data_y: list[float], stretch: float = 2.5) -> list[float]:
    """Horizontal lines labelled with their value; returns the y drawn, for the axis limits. A reference so far from
    the points that showing it would stretch the y range past `stretch` times theirs (banking77's 77-class majority
    rate under methods at 50%) is named in the legend, with its value and side, instead of squashing the methods."""
    lo, hi = min(data_y), max(data_y)
    span = max(hi - lo, 1.0)
    drawn = []
    for name, value in refs.items():
        y, style = 100 * value, REFERENCE_STYLE[name]
        label = f"{name} ({y:.1f}%)"
        if max(hi, y) - min(lo, y) > stretch * span:
            ax.plot([], [], lw=1.2, label=f"{label}, {'below' if y < lo else 'above'} the axis", **style)
            continue
        ax.axhline(y, lw=1.2, zorder=1, label=label, **style)
        drawn.append(y)
    return drawn


def method_colors(methods: list[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per method, fixed across every task's figures so a method looks the same everywhere."""
    palette = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "olive", "cyan")]
    palette.append("tab:gray")
    markers = "osD^vPX"  # 7 markers against 10 colours: a pair repeats only after 70 methods
    return {m: (palette[i % len(palette)], markers[i % len(markers)]) for i, m in enumerate(methods)}


def padded_limits(
    values: list[float], log: bool = False, low: float = 0.08, high: float = 0.08
) -> tuple[float, float]:
    """Axis limits with a margin each side (a share of the span), so no marker or error bar sits on the frame."""
    scaled = [math.log10(v) for v in values] if log else list(values)
    lo, hi = min(scaled), max(scaled)
    span = (hi - lo) or (1.0 if log else abs(hi) or 1.0)
    lo, hi = lo - low * span, hi + high * span
    return (10**lo, 10**hi) if log else (lo, hi)


def scatter_plot(
    points: list[dict[str, Any]],
    x_key: str,
    x_label: str,
    log_x: bool,
    metric: str,
    title: str,
    refs: dict[str, float],
    path: Path,
) -> None:
    """One PNG: methods with ± std error bars and their names, the Pareto front as a red step line, reference lines."""
    import matplotlib.pyplot as plt

    xs = [p[x_key] for p in points]
    ys = [100 * p[f"validation_{metric}_mean"] for p in points]
    errs = [100 * (p[f"validation_{metric}_std"] or 0.0) for p in points]
    front = pareto_front(list(zip(xs, ys)))
    fig, ax = plt.subplots(figsize=(7.2, 5.2), dpi=110, layout="constrained")
    ax.errorbar(
        xs,
        ys,
        yerr=errs,
        fmt="o",
        color="tab:blue",
        ecolor="0.6",
        capsize=3,
        zorder=4,
        label="method (± std over seeds)",
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
    y_extent = [y - e for y, e in zip(ys, errs)] + [y + e for y, e in zip(ys, errs)]
    y_extent += draw_references(ax, refs, y_extent)
    labels = [
        ax.annotate(p["method"], (x, y), xytext=(6, 4), clip_on=False, zorder=3, **LABEL_STYLE)
        for p, x, y in zip(points, xs, ys)
    ]
    if log_x:
        ax.set_xscale("log")
    ax.set_xlim(*padded_limits(xs, log=log_x, low=0.1, high=0.22))  # the right margin leaves room for names
    ax.set_ylim(*padded_limits(y_extent, low=0.08, high=0.14))
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"validation {metric} (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    separate_labels(fig, ax, labels, list(zip(xs, ys)))
    save_figure(fig, path)


def separate_labels(fig: Any, ax: Any, labels: list[Any], anchors: list[tuple[float, float]], passes: int = 2) -> None:
    """Nudge point labels vertically off each other and off other methods' markers (matplotlib does neither), so
    every method name stays legible and no label covers a point. Moves are worked out on the boxes in pixels; a
    second pass after a redraw catches what the constrained layout shifted."""
    for _ in range(passes):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [list(label.get_window_extent(renderer).extents) for label in labels]
        markers = [
            (x - MARKER_PX, y - MARKER_PX, x + MARKER_PX, y + MARKER_PX) for x, y in ax.transData.transform(anchors)
        ]
        total = [0.0] * len(labels)
        for _ in range(100):
            moves = label_moves([tuple(b) for b in boxes], markers)
            if not any(moves):
                break
            for i, move in enumerate(moves):
                boxes[i][1] += move
                boxes[i][3] += move
                total[i] += move
        if not any(total):
            return
        for label, move in zip(labels, total):
            x, y = label.xyann
            label.xyann = (x, y + move * 72 / fig.dpi)  # pixels -> the offset's points


def label_moves(
    boxes: list[tuple[float, float, float, float]], markers: list[tuple[float, float, float, float]]
) -> list[float]:
    """Vertical pixel moves (up > 0) that part overlapping label boxes (half each) and lift a label off any marker
    but its own; boxes and markers as (x0, y0, x1, y1) in pixels, label i belonging to marker i. Plain Python."""
    moves = [0.0] * len(boxes)
    for i, a in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            b = boxes[j]
            overlap = min(a[3], b[3]) - max(a[1], b[1])
            if overlap > 0 and min(a[2], b[2]) > max(a[0], b[0]):
                lower, upper = (i, j) if (a[1], i) < (b[1], j) else (j, i)
                moves[lower] -= (overlap + 2) / 2
                moves[upper] += (overlap + 2) / 2
        for j, m in enumerate(markers):
            if j != i and min(a[2], m[2]) > max(a[0], m[0]) and min(a[3], m[3]) > max(a[1], m[1]):
                above = a[1] + a[3] >= m[1] + m[3]
                moves[i] += (m[3] - a[1] + 1) if above else -(a[3] - m[1] + 1)
    return moves


def save_figure(fig: Any, path: Path) -> None:
    """Write the PNG atomically, cropped to everything drawn (labels outside the axes included), then close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
