"""Recipe files -> a validated RunConfig: find a recipe by name, resolve its `include:` parts, apply overrides.

Recipes ship inside the wheel as peftkit/recipes (./recipes in a source checkout); the dataclasses they become,
and the checks on every value, are in config.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from peftkit.config import RESULT_NEUTRAL_KEYS, RunConfig, check_budget_overrides, check_section, flat_config
from peftkit.errors import PeftkitError, short_value, unknown_choice


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key written twice in one YAML mapping; its message names the key and its line."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (plain YAML loading keeps the last silently,
    so `lr` set twice would quietly train with the second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges on purpose; a mapping key is refused by SafeLoader itself
            key = self.construct_object(key_node)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise DuplicateKeyError(None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def override_list(overrides: str | Iterable[str] | None) -> list[str]:
    """Overrides as given in code: a list of `section.key=value` strings, one such string alone (one override, never
    read as a sequence of one-character overrides), or None for none."""
    if overrides is None:
        return []
    items = [overrides] if isinstance(overrides, str) else list(overrides)
    for item in items:
        if not isinstance(item, str):
            raise PeftkitError(
                f"an override must be a string section.key=value (e.g. train.lr=1e-4), got {type(item).__name__} "
                f"{short_value(item)}"
            )
    return items


def apply_overrides(data: dict[str, Any], overrides: str | Iterable[str] | None) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw config mapping."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    recipe_method = method_name(data)
    given: set[str] = set()  # method keys set by the overrides
    for item in override_list(overrides):
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise PeftkitError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4, method.r=16)")
        section, _, name = key.partition(".")
        if section not in ("task", "model", "method", "train"):
            raise unknown_choice("config section", section, ["task", "model", "method", "train"])
        try:
            value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else None
        except DuplicateKeyError as e:
            raise PeftkitError(f"override {item!r}: {e.problem}") from None
        except yaml.YAMLError:
            value = raw
        check_section(section, data.get(section))
        data[section] = dict(data.get(section) or {})
        data[section][name] = value
        if section == "method":
            given.add(name)
    return drop_other_methods_options(data, recipe_method, given)


def method_name(data: dict[str, Any]) -> str | None:
    """The canonical method name of a raw config mapping (an old name such as `adapter` read as its current one)."""
    from peftkit.adapters import METHOD_ALIASES

    name = data["method"].get("name") if isinstance(data.get("method"), dict) else None
    return METHOD_ALIASES.get(name, name) if isinstance(name, str) else name


def drop_other_methods_options(data: dict[str, Any], recipe_method: str | None, given: set[str]) -> dict[str, Any]:
    """After `method.name=X` over a recipe of another method, the recipe's method options belong to that method:
    they are dropped, and X starts from its defaults plus the options given with it. An option given that X does
    not have is still refused by the config's checks, never passed on or ignored. (load_config says what went.)"""
    if "name" in given and recipe_method is not None and method_name(data) != recipe_method:
        data["method"] = {k: v for k, v in data["method"].items() if k == "name" or k in given}
    return data


def recipes_dir() -> Path:
    """Recipes ship inside the wheel as peftkit/recipes; in a source checkout they live in ./recipes."""
    packaged = Path(__file__).parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "recipes"


def list_recipes() -> dict[str, Path]:
    """Runnable recipes: the top-level `<task>-<method>.yaml` files (tasks/, methods/ and profiles/ hold parts)."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def find_recipe(name: str) -> Path:
    """A recipe by name; an old method name in it (e.g. `sst2-adapter`) resolves to the current one."""
    from peftkit.adapters import METHOD_ALIASES

    recipes = list_recipes()
    if name not in recipes:
        task, _, rest = name.partition("-")
        method, _, variant = rest.partition("-")
        renamed = "-".join(p for p in (task, METHOD_ALIASES.get(method, method), variant) if p)
        if renamed not in recipes:
            raise unknown_choice("recipe", name, recipes)
        name = renamed
    return recipes[name]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise PeftkitError(f"config file {path} is a directory, not a YAML file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise PeftkitError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise PeftkitError(f"config file {path} is not UTF-8 text") from None
    except RecursionError:
        raise PeftkitError(f"{path} is nested too deeply to be a recipe") from None
    except yaml.YAMLError as e:
        raise PeftkitError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"{path} must hold a mapping with sections task, model, method, train")
    return data


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file with its `include:` list resolved: each included file (path relative to this one) is merged
    in order, then this file's own keys on top. Sections merge key by key, so a recipe states only what differs."""
    path = Path(path).resolve()
    if path in _seen:
        raise PeftkitError(f"recipe include cycle: {' -> '.join(p.name for p in (*_seen, path))}")
    data = read_yaml(path)
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise PeftkitError(f"{path}: include must be a file name or a list of them, got {includes!r}")
    merged: dict[str, Any] = {}
    for name in includes:
        merged = merge_sections(merged, read_recipe(include_path(path, name), (*_seen, path)))
    return merge_sections(merged, data)


def include_path(recipe: Path, name: str) -> Path:
    """An included file: beside the including recipe, else a built-in part (`tasks/sst2.yaml`), so a user's own
    YAML outside the package can include the parts the built-in recipes are made of."""
    beside, built_in = recipe.parent / name, recipes_dir() / name
    if beside.exists():
        return beside
    if built_in.is_file():
        return built_in
    parts = [
        f"{folder}/{p.name}"
        for folder in ("tasks", "methods")
        for p in sorted((recipes_dir() / folder).glob("*.yaml"))
    ]
    raise unknown_choice(f"include (not beside {recipe} nor built in)", name, parts)


def merge_sections(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, one level deep: mappings (the sections) merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_config(
    recipe: str | None = None,
    config_file: str | None = None,
    overrides: str | Iterable[str] | None = (),
    notes: bool = True,
) -> RunConfig:
    """Resolve a recipe name or a user's YAML file, apply overrides (a list, or one `section.key=value` string)
    and validate everything. `notes`: say on stderr what the overrides made of the recipe (options of another method
    dropped, its expected result dropped, train settings chosen for another method or task); bench, which overrides
    on purpose, turns them off."""
    overrides = override_list(overrides)
    if config_file:
        data = read_recipe(config_file)
        name = data.get("recipe") or Path(config_file).stem  # a run's config.yaml keeps its recipe's name
    elif recipe:
        if not isinstance(recipe, str):
            raise PeftkitError(f"a recipe name must be a string, got {recipe!r}")
        path = find_recipe(recipe)
        data, name = read_recipe(path), path.stem
    else:
        raise PeftkitError("name a recipe (peftkit recipes lists them) or pass --config FILE.yaml")
    resolved = apply_overrides(data, overrides)
    if not isinstance(name, str):
        raise PeftkitError(f"the config's recipe name must be a string, got {name!r}")
    resolved["recipe"] = name
    config = RunConfig.from_dict(resolved)
    given = [item.partition("=")[0].strip() for item in overrides]
    check_budget_overrides(config.train, set(given))
    said = reconcile_overrides(data, resolved, config, given, built_in=not config_file)
    if notes:  # said once the config is valid, so a refused one stays a single line
        for note in said:
            print(f"peftkit: note: {note}", file=sys.stderr)
    return config


def reconcile_overrides(
    data: dict[str, Any], resolved: dict[str, Any], config: RunConfig, given: list[str], built_in: bool = True
) -> list[str]:
    """Drop from `config` the recipe's claim that the overrides `given` made untrue, and return one note per thing
    they changed. `data` is the recipe as written, `resolved` with the overrides, `config` that validated.

    The `expected` result was measured with exactly the recipe's settings: an override that changes a key that can
    change the numbers (all but RESULT_NEUTRAL_KEYS) drops it, so no run records or shows a claim measured for
    another method, task, model or budget. A method switch drops the old method's options (apply_overrides); the
    train settings stay as the recipe chose them for its own method and task, and a note says so (for a built-in
    recipe: a user's own file's settings are the user's)."""
    if not given:
        return []
    try:
        as_written: RunConfig | None = RunConfig.from_dict({**data, "recipe": config.recipe})
    except PeftkitError:  # a file that is valid only with its overrides: every override counts as a change
        as_written = None
    notes = []
    dropped = [k for k in data.get("method") or {} if k not in resolved["method"]]  # only a method switch drops
    if dropped:
        new = config.method.name
        notes.append(
            f"method.name={new} drops the recipe's {method_name(data)} options ({', '.join(dropped)}); "
            f"{new} starts from its own defaults plus any method.KEY=VALUE given"
        )
    changed = changed_settings(as_written, config, given)
    if config.expected is not None and changed:
        shown = ", ".join(f"{k}={v}" for k, v in changed.items())
        notes.append(
            f"{config.recipe}'s expected result ({config.expected.metric} {config.expected.mean:.4f}) is dropped, "
            f"not recorded: it was measured with the recipe's own settings, and {shown} changes them"
        )
        config.expected = None
    if built_in and as_written and "train" in data:
        chosen_for = (as_written.method.name, as_written.task.name)
        if chosen_for != (config.method.name, config.task.name):
            lr = "" if "train.lr" in given else f" (train.lr={config.train.lr:g})"
            notes.append(
                f"{config.recipe}'s train settings{lr} were chosen for {chosen_for[0]} on {chosen_for[1]} and are "
                f"kept as they are for {config.method.name} on {config.task.name}; tune them (train.lr=...) for it"
            )
    return notes


def changed_settings(as_written: RunConfig | None, config: RunConfig, given: list[str]) -> dict[str, Any]:
    """{key: value now} for each overridden key in `given` that can change a run's numbers (not RESULT_NEUTRAL_KEYS)
    and now differs from the recipe as written: setting a key to the value it had changes nothing. Without a
    recipe as written to compare with (`None`), every such key counts."""
    before = flat_config(as_written.to_dict()) if as_written else {}
    after = flat_config(config.to_dict())
    return {
        k: after.get(k)
        for k in given
        if k not in RESULT_NEUTRAL_KEYS and (as_written is None or before.get(k) != after.get(k))
    }
