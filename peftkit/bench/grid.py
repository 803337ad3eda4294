"""The grid: which (task, method, seed) cells a bench runs, checked before anything trains, and each cell's job.

A cell's config is its recipe `<task>-<method>` plus the profile's dotted overrides and its own (seed, model, data,
run folder): exactly what a user would type to reproduce it by hand. `cell_job` freezes all that a spawned cell
needs into one `CellJob`, so the runner passes a single value down instead of a growing list of arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.bench.profiles import Profile, canonical_method
from peftkit.config import RESULT_NEUTRAL_KEYS, RunConfig, flat_config
from peftkit.errors import PeftkitError, unknown_choice
from peftkit.io import read_json
from peftkit.recipe_files import apply_overrides, list_recipes, load_config


@dataclass(frozen=True)
class Cell:
    """One (task, method, seed) run. `task` is a built-in task name or a task folder / data file path.

    `lr` is set for a cell of a learning-rate grid (profile `lr_grid`, see selection.py): it overrides train.lr.
    """

    task: str
    method: str
    seed: int
    lr: float | None = None

    @property
    def task_label(self) -> str:
        return task_label(self.task)

    @property
    def id(self) -> str:
        lr = "" if self.lr is None else f"__lr{self.lr:g}"
        return f"{self.task_label}__{self.method}{lr}__seed{self.seed}"


@dataclass(frozen=True)
class CellJob:
    """Everything the spawned cell needs: the resolved config, where it runs, and how to time inference after.

    Plain data, so it crosses to the spawned process as is; the child validates `config` again on arrival.
    """

    cell: Cell
    config: dict[str, Any]  # the resolved RunConfig as a mapping (RunConfig.to_dict)
    overrides: tuple[str, ...]  # what was applied on top of the recipe, in order (kept in the cell's manifest)
    run_dir: Path
    latency_examples: int  # validation rows timed for inference latency
    latency_batch_size: int
    user_metrics: tuple[str, ...] = ()  # evaluate module specs scored on the kept model (peftkit.user_metrics)


def task_label(task: str) -> str:
    """The name used in file names and tables: the built-in name, or the folder/file stem of a path."""
    return Path(task).stem if "/" in task or "." in task else task


def plan_cells(profile: Profile, tasks: list[str], methods: list[str], seeds: list[int] | None) -> list[Cell]:
    """Tasks outermost, so one task's tables fill up first; explicit --seeds replace the profile's per-task seeds."""
    return [
        Cell(task, method, seed)
        for task in tasks
        for method in methods
        for seed in (seeds if seeds is not None else profile.seeds_for(task_label(task)))
    ]


def cell_path(out: str | Path, cell: Cell) -> Path:
    """The cell's result file; one written under a method's old name (e.g. `adapter`) still counts as its result."""
    path = Path(out) / "cells" / f"{cell.id}.json"
    if not path.exists():
        for old in _old_names(cell.method):
            legacy = path.with_name(f"{cell.task_label}__{old}__seed{cell.seed}.json")
            if legacy.exists():
                return legacy
    return path


# what the report reads from a cell file: from every one, then from an ok one or a failed one
CELL_KEYS = ("cell", "task", "method", "seed", "status", "manifest", "manifest.profile")
OK_CELL_KEYS = (
    "task_metrics",
    "validation",
    "steps",
    "memory_kind",
    "train_examples",
    "validation_examples",
    "device",
    "manifest.config",
)
FAILED_CELL_KEYS = ("error",)


def read_cell(path: str | Path) -> dict[str, Any]:
    """A cell file, checked to hold what the report reads: one that lacks a key is a one-line error naming the file
    and the keys, as one that is not JSON is (the runner writes cells whole, so either is damage from outside)."""
    record = read_json(path)
    if not isinstance(record, dict):
        raise PeftkitError(f"cell file {path} is not a JSON object; remove it to run the cell again")
    wanted = (*CELL_KEYS, *(OK_CELL_KEYS if record.get("status") == "ok" else FAILED_CELL_KEYS))
    missing = [key for key in wanted if not _has(record, key)]
    if missing:
        raise PeftkitError(f"cell file {path} lacks {', '.join(missing)}; remove it to run the cell again")
    return record


def config_differences(recorded: dict[str, Any] | None, planned: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, planned)} for each `section.key` whose value differs, RESULT_NEUTRAL_KEYS aside: the
    comparison a resume makes (resume.changed_keys), over the keys that can change a cell's numbers."""
    from peftkit.resume import changed_keys

    old, new = flat_config(recorded or {}), flat_config(planned)
    return {k: (old.get(k), new.get(k)) for k in changed_keys(old, new, RESULT_NEUTRAL_KEYS)}


def _has(record: dict[str, Any], key: str) -> bool:
    """`key` or `section.key` is in the record; a dotted key counts as there when its section is missing (the
    section is what gets named)."""
    section, _, inner = key.partition(".")
    if not inner or section not in record:
        return section in record or bool(inner)
    return isinstance(record[section], dict) and inner in record[section]


def _old_names(method: str) -> list[str]:
    from peftkit.adapters import METHOD_ALIASES

    return [old for old, new in METHOD_ALIASES.items() if new == method]


def validate_choices(tasks: list[str], methods: list[str], data_dir: str | None = None) -> list[str]:
    """Check everything the grid names before anything trains, so a typo costs seconds, not an hour.

    Returns the methods under their current names (an old name such as `adapter` is accepted).
    """
    from peftkit.adapters import available_methods
    from peftkit.data import BUILTIN_TASKS, is_task_source, task_names

    if not tasks or not methods:
        raise PeftkitError("the grid is empty: give at least one task (--tasks) and one method (--methods)")
    for task in tasks:
        if task not in BUILTIN_TASKS and not is_task_source(task, data_dir):
            raise unknown_choice(
                "task (or a task folder / .jsonl / .csv file, or a folder in --data-dir)", task, task_names(data_dir)
            )
    known = available_methods()
    methods = [canonical_method(m) for m in methods]
    for method in methods:
        if method not in known:
            raise unknown_choice("method", method, known)
    recipes = list_recipes()
    missing = [f"{t}-{m}" for t in tasks if t in BUILTIN_TASKS for m in methods if f"{t}-{m}" not in recipes]
    if missing:
        raise PeftkitError(
            f"bench cells use the recipe <task>-<method>; missing: {', '.join(missing)} "
            f"(add them to recipes/ or narrow --tasks/--methods)"
        )
    return methods


def cell_job(cell: Cell, profile: Profile, out: Path, model: str | None, data_dir: str | None) -> CellJob:
    """The cell's recipe plus, in order, the profile's overrides and the cell's own (seed, model, data, run folder).

    A built-in task uses its recipe `<task>-<method>`; a task folder or file has none, so it gets the method's
    defaults (what `peftkit train --config` would give a user's YAML naming only the task and the method).
    """
    overrides = profile.overrides_for(cell.task_label, cell.method)
    if cell.lr is not None:
        overrides.append(f"train.lr={cell.lr!r}")
    if profile.bf16_on_cuda:
        overrides.append(f"train.bf16={'true' if cuda_has_bf16() else 'false'}")
    overrides += [
        f"train.seed={cell.seed}",
        "train.progress=false",
        f"train.output_dir={out / 'runs'}",
        f"train.run_name={cell.id}",
    ]
    if model:
        overrides.append(f"model.name_or_path={model}")
    if data_dir:
        overrides.append(f"task.data_dir={data_dir}")
    recipe = f"{cell.task}-{cell.method}"
    if recipe in list_recipes():
        config = load_config(recipe=recipe, overrides=overrides, notes=False)
    else:
        data = apply_overrides({"task": {"name": cell.task}, "method": {"name": cell.method}}, overrides)
        data["recipe"] = f"{cell.task_label}-{cell.method}"
        config = RunConfig.from_dict(data)
    run_dir = Path(config.train.output_dir) / config.train.run_name
    return CellJob(
        cell, config.to_dict(), tuple(overrides), run_dir, profile.latency_examples, profile.latency_batch_size
    )


def cuda_has_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
