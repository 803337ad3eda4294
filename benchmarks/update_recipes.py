"""Write what a bench chose into the recipes: each `recipes/<task>-<method>.yaml` gets the settings its cells ran
with at the chosen learning rate, and an `expected:` section with what they reached (mean ± std over seeds).

    python benchmarks/update_recipes.py benchmarks/results/converged [--recipes recipes] [--dry-run]

A recipe then trains exactly as the benchmark's cell did (same budget, dev split, early stopping, learning rate),
so `peftkit train <task>-<method>` with no overrides reproduces the expected number within its spread, and
`peftkit recipes` shows it. Only (task, method) pairs with every planned seed finished are written.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from peftkit.io import atomic_write_text

# overrides that place or label a bench cell rather than define the recipe
CELL_ONLY = ("train.seed", "train.progress", "train.output_dir", "train.run_name", "train.device", "task.data_dir")


def recipe_settings(overrides: list[str]) -> dict[str, dict[str, object]]:
    """The cell's dotted overrides (last one wins) as YAML sections, without the ones that only place the cell."""
    sections: dict[str, dict[str, object]] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key in CELL_ONLY or "." not in key:
            continue
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    return sections


def expected_section(cells: list[dict], profile: str) -> dict[str, object]:
    metric = cells[0]["task_metrics"][0]
    values = [c["validation"][metric] for c in cells]
    manifest = cells[0]["manifest"]
    return {
        "metric": metric,
        "mean": round(statistics.mean(values), 6),
        "std": round(statistics.stdev(values), 6) if len(values) > 1 else None,
        "seeds": len(values),
        "train_seconds": round(statistics.mean(c["train_seconds"] for c in cells), 1),
        "peak_memory_mb": round(statistics.mean(c["peak_memory_mb"] for c in cells)),
        "profile": profile,
        "machine": f"{manifest.get('cpu_model', 'unknown CPU')}, {manifest.get('cpu_count', '?')} cores, "
        f"{'bf16' if cells[0].get('bf16') else 'fp32'}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--recipes", type=Path, default=Path("recipes"))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if not (args.results / "selection.json").is_file():
        parser.error(f"{args.results} holds no selection.json: give a bench folder whose grid chose learning rates")
    selection = json.loads((args.results / "selection.json").read_text())
    cells = [json.loads(p.read_text()) for p in sorted((args.results / "cells").glob("*.json"))]
    for task, methods in selection["tasks"].items():
        for method, choice in methods.items():
            chosen = [
                c
                for c in cells
                if (c["task"], c["method"], c.get("grid_lr")) == (task, method, choice["chosen_lr"])
                and c["status"] == "ok"
            ]
            profile = chosen[0]["manifest"]["profile"] if chosen else ""
            if not chosen or len(chosen) < 3:
                print(f"{task}-{method}: {len(chosen)} finished seed(s) at the chosen rate; not written")
                continue
            path = args.recipes / f"{task}-{method}.yaml"
            header = [
                line
                for line in path.read_text().splitlines()
                if line.startswith(("#", "include:")) and not line.startswith("# chosen by")
            ]
            body = recipe_settings(chosen[0]["manifest"]["overrides"])
            body["expected"] = expected_section(chosen, profile)
            text = "\n".join(header) + (
                f"\n# chosen by `peftkit bench --profile {profile}` ({args.results}): the learning rate on dev,"
                " the budget and early stopping of its cells\n" + yaml.safe_dump(body, sort_keys=False)
            )
            print(f"{task}-{method}: lr {choice['chosen_lr']:g}, expected {body['expected']}")
            if not args.dry_run:
                atomic_write_text(path, text)


if __name__ == "__main__":
    main()
