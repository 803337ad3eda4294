"""The built-in recipes' trainable share of parameters, as `peftkit recipes` lists it, read from a shipped table.

Counting a recipe means importing transformers and peft and building its model with the method applied: the
listing took 10-25 s on 2 cores for numbers that only change when a recipe, a method or peft does. So the counts
ship in recipes/trainable.json, each beside a key of everything it was counted from (model, pooling, task,
method and options) and the peft and transformers versions. An entry whose key no longer matches (an edited recipe, a
new one, another peft) is counted afresh, never shown stale. After changing how a method builds, rewrite it:

    python -m peftkit.trainable_table
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version

from peftkit.config import RunConfig
from peftkit.errors import PeftkitError
from peftkit.io import atomic_write_json, read_json
from peftkit.recipe_files import list_recipes, load_config, recipes_dir

TABLE_FILE = "trainable.json"
Table = dict[str, dict[str, str]]  # recipe name -> {"key": count_key, "libraries": libraries(), "pct": "0.123"}


def count_key(cfg: RunConfig) -> str:
    """A digest of what modeling.trainable_pct_without_weights reads from a config: equal keys (under the same
    libraries, see `libraries`) give equal counts."""
    data = cfg.to_dict()
    inputs = {"model": data["model"], "task": cfg.task.name, "method": data["method"]}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def libraries() -> str:
    """The libraries a count was made with. Kept apart from the key: another peft makes the listing count afresh,
    while the repository's own check (recipes against table) does not depend on which peft CI installs."""
    return f"peft {version('peft')}, transformers {version('transformers')}"


def read_table() -> Table:
    """The shipped table; empty where it is not shipped (every recipe is then counted)."""
    path = recipes_dir() / TABLE_FILE
    return read_json(path) if path.is_file() else {}


def trainable_pct(cfg: RunConfig, table: Table) -> str:
    """The recipe's entry in the table when it was counted from this very config; otherwise counted now."""
    entry = table.get(cfg.recipe or "")
    if entry and entry.get("key") == count_key(cfg) and entry.get("libraries") == libraries():
        return entry["pct"]
    from peftkit.modeling import trainable_pct_without_weights

    return trainable_pct_without_weights(cfg)


def write_table() -> None:
    """Count every built-in recipe afresh and write the table (atomically). A recipe that cannot be counted here
    (its model not available offline) is refused rather than written as '?'."""
    from peftkit.modeling import trainable_pct_without_weights  # torch: imported only to count

    table: Table = {}
    for name in list_recipes():
        cfg = load_config(recipe=name)
        pct = trainable_pct_without_weights(cfg)
        if pct == "?":
            raise PeftkitError(f"recipe {name}: its trainable share could not be counted (is its model installed?)")
        table[name] = {"key": count_key(cfg), "libraries": libraries(), "pct": pct}
    atomic_write_json(recipes_dir() / TABLE_FILE, table)


if __name__ == "__main__":
    write_table()
