"""Bench profiles: named budgets kept as data (`recipes/profiles/<name>.yaml`), read into a frozen `Profile`.

A budget is something users tune and reviewers read, so it lives beside the recipes it sizes rather than in code.
A profile that names no tasks runs every built-in task, and one that names no methods runs every registered method
but its `exclude_methods`: a task added to the task table or a method added to the registry joins the grid without
an edit here. The same two lists give the report its row order.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.config_values import build_dataclass
from peftkit.errors import PeftkitError, unknown_choice
from peftkit.recipe_files import read_yaml, recipes_dir


@dataclass(frozen=True)
class Profile:
    """A named budget: which cells to run by default and the overrides that size every cell.

    `overrides` apply to every cell, then `task_overrides[task]`, then `method_overrides[method]`; all are the
    dotted strings users pass to `peftkit train`, applied on top of the recipe, so a cell's budget is visible and
    reproducible by hand. `tasks` and `methods` are resolved when the profile is loaded (never empty).
    """

    name: str
    description: str
    seeds: tuple[int, ...]
    tasks: tuple[str, ...] = ()  # empty in the YAML: every built-in task
    methods: tuple[str, ...] = ()  # empty in the YAML: every registered method but `exclude_methods`
    exclude_methods: tuple[str, ...] = ()
    more_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tasks that get extra seeds
    overrides: tuple[str, ...] = ()
    task_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    method_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # e.g. short-budget learning rates
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)  # chosen on dev per task (selection.py)
    bf16_on_cuda: bool = False  # bf16 autocast when the cell lands on a bf16-capable GPU; fp32 elsewhere
    latency_examples: int = 256  # validation rows timed for inference latency after training
    latency_batch_size: int = 32

    def seeds_for(self, task: str) -> tuple[int, ...]:
        return self.more_seeds.get(task, self.seeds)

    def overrides_for(self, task: str, method: str = "") -> list[str]:
        return [*self.overrides, *self.task_overrides.get(task, ()), *self.method_overrides.get(method, ())]


def all_tasks() -> tuple[str, ...]:
    """The built-in tasks, in the task table's order."""
    from peftkit.data import BUILTIN_TASKS

    return tuple(BUILTIN_TASKS)


def all_methods() -> tuple[str, ...]:
    """The registered methods: built-ins in the registry's order, then plugins by name."""
    from peftkit.adapters import BUILTIN_METHODS, available_methods

    known = available_methods()
    return (*(m for m in BUILTIN_METHODS if m in known), *sorted(set(known) - set(BUILTIN_METHODS)))


def canonical_method(name: str) -> str:
    """A method's current name (`adapter` was renamed `bottleneck`; old cell files and flags still say it)."""
    from peftkit.adapters import METHOD_ALIASES

    return METHOD_ALIASES.get(name, name)


def profiles_dir() -> Path:
    return recipes_dir() / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def profile_stem(profile: str) -> str:
    """A profile's name: a built-in one's as given, a user's profile file's by its stem."""
    return Path(profile).stem if is_profile_file(profile) else profile


def is_profile_file(profile: str) -> bool:
    """True when --profile names a user's own YAML file (by its suffix) rather than a built-in profile."""
    return isinstance(profile, str) and profile.lower().endswith((".yaml", ".yml"))


def load_profile(name: str) -> Profile:
    """Read, validate and resolve a built-in `recipes/profiles/<name>.yaml`, or a user's own profile file (a path
    ending in .yaml/.yml, named by its stem; an installed wheel's profile folder is no place to write); any mistake
    is a one-line PeftkitError."""
    if is_profile_file(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise PeftkitError(
                f"bench profile file {name} does not exist (or name a built-in profile: "
                f"{', '.join(available_profiles())})"
            )
        name = profile_stem(name)
    else:
        path = profiles_dir() / f"{name}.yaml"
        if not isinstance(name, str) or "/" in name or not path.is_file():
            raise unknown_choice("bench profile", str(name), available_profiles())
    where = f"bench profile {name}"
    data = read_yaml(path)
    missing = [k for k in ("description", "seeds") if k not in data]
    if missing:
        raise PeftkitError(f"{where} ({path}) lacks {', '.join(missing)}")
    if "name" in data:
        raise PeftkitError(f"{where}: a profile is named by its file name; remove the name key")
    # scalars (and unknown keys) are checked by the config's validator; the sequences and tables here
    raw = build_dataclass(
        Profile,
        {
            **data,
            "name": name,
            "seeds": (),
            "tasks": (),
            "methods": (),
            "exclude_methods": (),
            "more_seeds": {},
            "overrides": (),
            "task_overrides": {},
            "method_overrides": {},
            "lr_grid": {},
        },
        where,
    )
    exclude = tuple(canonical_method(m) for m in _items(data.get("exclude_methods"), str, f"{where}.exclude_methods"))
    methods = _items(data.get("methods"), str, f"{where}.methods")
    _check_methods(data, where)
    return dataclasses.replace(
        raw,
        seeds=_items(data["seeds"], int, f"{where}.seeds"),
        tasks=_items(data.get("tasks"), str, f"{where}.tasks") or all_tasks(),
        methods=tuple(canonical_method(m) for m in methods) or tuple(m for m in all_methods() if m not in exclude),
        exclude_methods=exclude,
        more_seeds=_table(data.get("more_seeds"), int, f"{where}.more_seeds"),
        overrides=_items(data.get("overrides"), str, f"{where}.overrides"),
        task_overrides=_table(data.get("task_overrides"), str, f"{where}.task_overrides"),
        method_overrides={
            canonical_method(m): v
            for m, v in _table(data.get("method_overrides"), str, f"{where}.method_overrides").items()
        },
        lr_grid={canonical_method(m): v for m, v in _table(data.get("lr_grid"), float, f"{where}.lr_grid").items()},
    )


def _check_methods(data: dict[str, Any], where: str) -> None:
    """Every method the profile names is registered: a misspelt key of lr_grid or method_overrides would otherwise
    be read by no cell, and the grid would run at the recipe's values with nothing said. (Task keys cannot be
    checked so: a user's own task is named by its folder/file stem.)"""
    known = all_methods()
    for key in ("methods", "exclude_methods", "method_overrides", "lr_grid"):
        value = data.get(key)
        for method in value if isinstance(value, (list, dict)) else ():
            if canonical_method(str(method)) not in known:
                raise unknown_choice(f"method in {where}.{key}", str(method), known)


def _items(value: Any, kind: type, where: str) -> tuple[Any, ...]:
    """A YAML list of strings, integers or positive numbers as a tuple (null or absent: empty)."""
    if value is None:
        return ()
    if kind is float:  # learning rates: YAML 1.1 reads 2e-3 (no dot) as a string, so parse those too
        return tuple(_positive_number(v, where) for v in (value if isinstance(value, list) else [value]))
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        what = "integers" if kind is int else "strings"
        raise PeftkitError(f"{where} must be a list of {what}, got {value!r}")
    return tuple(value)


def _positive_number(value: Any, where: str) -> float:
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise PeftkitError(f"{where} must be a list of positive numbers (e.g. [1e-3, 2e-3]), got {value!r}")
    return number


def _table(value: Any, kind: type, where: str) -> dict[str, tuple[Any, ...]]:
    """A YAML mapping name -> list, e.g. task_overrides: {sst2: [train.max_steps=192]}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PeftkitError(f"{where} must be a mapping of name -> list, got {value!r}")
    return {str(k): _items(v, kind, f"{where}.{k}") for k, v in value.items()}
