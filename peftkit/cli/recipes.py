"""`peftkit recipes`: the built-in recipes with their task, method, trainable share of parameters, and the metric
each is expected to reach (measured by the benchmark that chose its settings; see the recipe's `expected:`)."""

from __future__ import annotations

import argparse

HELP = "list the built-in recipes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-params", action="store_true", help="skip the trainable-%% column (faster)")


def run(args: argparse.Namespace) -> int:
    from peftkit.console import print_table
    from peftkit.recipe_files import list_recipes, load_config
    from peftkit.trainable_table import read_table, trainable_pct

    table = {} if args.no_params else read_table()
    rows = []
    for name in list_recipes():
        cfg = load_config(recipe=name)
        pct = "" if args.no_params else trainable_pct(cfg, table)
        rows.append((name, cfg.task.name, cfg.method.name, pct, expected_text(cfg.expected)))
    print_table(("recipe", "task", "method", "trainable %", "expected (mean ± std, profile)"), rows)
    return 0


def expected_text(expected) -> str:
    """e.g. `accuracy 91.2 ± 0.4 (converged)`; empty for a recipe no benchmark has measured yet."""
    if expected is None:
        return ""
    spread = f" ± {100 * expected.std:.1f}" if expected.std is not None else ""
    return f"{expected.metric} {100 * expected.mean:.1f}{spread} ({expected.profile or 'measured'})"
