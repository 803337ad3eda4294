"""Each method's learning rate, chosen on a dev split before the seeds that are reported.

The protocol a profile with `lr_grid` follows (and that `selection.json` states at the top of the results): per
task and method, train once per learning rate of the method's grid at the first seed, read the main metric on the
dev split carved from train (`task.dev_size`, the same rows for every seed), keep the best learning rate, and run
the other seeds at it. Validation and test are never read by any choice (the best step is chosen on dev too); the
report shows them for the chosen learning rate only, the grid's other cells stay on disk as the evidence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.bench.grid import Cell, cell_path, read_cell
from peftkit.io import atomic_write_json, read_json

SELECTION_FILE = "selection.json"
PROTOCOL = (
    "Learning rate chosen per task and method: one run per value of the method's grid at seed {seed}, scored by "
    "the main metric on a dev split carved from train (seeded, the same rows for every run); the chosen value then "
    "runs seeds {seeds}. Best step and early stopping also read dev only, so validation and test were never used "
    "for any choice."
)


def grid_cells(cells: list[Cell], lr_grid: dict[str, tuple[float, ...]]) -> tuple[list[Cell], list[Cell]]:
    """Split the planned cells into (cells to run now, the (task, method) pairs whose learning rate is chosen).

    A method with a grid runs every grid value at its first planned seed now; its other seeds wait for the choice
    (`seed_cells`). Methods without a grid keep their planned cells.
    """
    now: list[Cell] = []
    firsts: dict[tuple[str, str], Cell] = {}  # (task, method) -> its first planned cell
    for cell in cells:
        grid = lr_grid.get(cell.method)
        if not grid:
            now.append(cell)
        elif (cell.task, cell.method) not in firsts:
            firsts[cell.task, cell.method] = cell
            now += [Cell(cell.task, cell.method, cell.seed, lr) for lr in grid]
    return now, list(firsts.values())


def choose(out: Path, firsts: list[Cell], lr_grid: dict[str, tuple[float, ...]]) -> dict[str, Any]:
    """{task: {method: {"chosen_lr", "dev": {lr: score}, "metric"}}} from the grid's cell files (failed: skipped)."""
    tasks: dict[str, dict[str, Any]] = {}
    for first in firsts:
        scores: dict[str, float] = {}
        metric = None
        for lr in lr_grid[first.method]:
            record = read_cell(cell_path(out, Cell(first.task, first.method, first.seed, lr)))
            if record.get("status") == "ok" and record.get("dev"):
                metric = record["task_metrics"][0]
                scores[repr(lr)] = record["dev"][metric]
        best = best_rate(scores)
        tasks.setdefault(first.task_label, {})[first.method] = {
            "chosen_lr": float(best) if best is not None else None,
            "metric": metric,
            "dev": scores,
        }
    return tasks


def best_rate(scores: dict[Any, float]) -> Any:
    """The learning rate with the best dev score (None if none scored); ties: the first listed, the smaller value."""
    return max(scores, key=lambda lr: scores[lr]) if scores else None


def seed_cells(
    firsts: list[Cell], planned: list[Cell], choices: dict[str, dict[str, Any]]
) -> tuple[list[Cell], list[Cell]]:
    """(the remaining seeds at each chosen learning rate, the pairs with no choice because every grid cell failed)."""
    later, unchosen = [], []
    for first in firsts:
        lr = choices[first.task_label][first.method]["chosen_lr"]
        if lr is None:
            unchosen.append(first)
            continue
        later += [
            Cell(c.task, c.method, c.seed, lr)
            for c in planned
            if c.task == first.task and c.method == first.method and c.seed != first.seed
        ]
    return later, unchosen


def write_selection(out: Path, choices: dict[str, dict[str, Any]], seeds: list[int]) -> None:
    """Record `choices` in OUT/selection.json, keeping the choices of pairs this run did not plan.

    A grid is often run in sittings (`--tasks rte --methods full`, then another subset, into the same folder);
    the report needs every pair's choice, or it would count that pair's other grid cells as extra seeds.
    """
    tasks: dict[str, dict[str, Any]] = {
        task: dict(methods) for task, methods in ((read_selection(out) or {}).get("tasks") or {}).items()
    }
    for task, methods in choices.items():
        tasks.setdefault(task, {}).update(methods)
    protocol = PROTOCOL.format(seed=seeds[0], seeds=", ".join(map(str, seeds[1:])) or "(none)")
    atomic_write_json(out / SELECTION_FILE, {"protocol": protocol, "tasks": tasks})


def read_selection(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / SELECTION_FILE
    return read_json(path) if path.is_file() else None


def choices_in_cells(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The choice `choose` made, read back from the grid's own cell records: {task: {method: {"chosen_lr"}}}.

    For pairs that selection.json does not name (cells copied in from another folder's sitting), so that the
    report never averages a grid's learning rates as if they were seeds. The grid seed is the one with the most
    learning rates; ties, as in `choose`, go to the smaller value.
    """
    pairs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        if cell.get("grid_lr") is not None:
            pairs.setdefault((cell["task"], cell["method"]), []).append(cell)
    tasks: dict[str, dict[str, Any]] = {}
    for (task, method), pair in pairs.items():
        rates_at = {
            seed: {c["grid_lr"] for c in pair if c["seed"] == seed} for seed in sorted({c["seed"] for c in pair})
        }
        grid_seed = max(rates_at, key=lambda seed: len(rates_at[seed]))
        scores = {
            c["grid_lr"]: c["dev"][c["task_metrics"][0]]
            for c in sorted(pair, key=lambda c: c["grid_lr"])
            if c["seed"] == grid_seed and c.get("status") == "ok" and c.get("dev")
        }
        if scores:
            tasks.setdefault(task, {})[method] = {"chosen_lr": best_rate(scores)}
    return tasks


def reported_cells(cells: list[dict[str, Any]], selection: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The cells the tables report: a grid cell only at its (task, method)'s chosen learning rate.

    selection.json's choice where it has one, else the one the grid's cells show (`choices_in_cells`)."""
    chosen = choices_in_cells(cells)
    for task, methods in ((selection or {}).get("tasks") or {}).items():
        chosen.setdefault(task, {}).update(methods)
    kept = []
    for cell in cells:
        choice = chosen.get(cell["task"], {}).get(cell["method"])
        if cell.get("grid_lr") is None or choice is None or cell["grid_lr"] == choice["chosen_lr"]:
            kept.append(cell)
    return kept
