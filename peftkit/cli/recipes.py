"""`peftkit recipes`: the built-in recipes with their task, method and trainable share of parameters."""

from __future__ import annotations

import argparse

HELP = "list the built-in recipes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-params", action="store_true", help="skip the trainable-%% column (faster)")


def run(args: argparse.Namespace) -> int:
    from peftkit.console import print_table
    from peftkit.modeling import trainable_pct_without_weights
    from peftkit.recipe_files import list_recipes, load_config

    rows = []
    for name in list_recipes():
        cfg = load_config(recipe=name)
        pct = "" if args.no_params else trainable_pct_without_weights(cfg)
        rows.append((name, cfg.task.name, cfg.method.name, pct))
    print_table(("recipe", "task", "method", "trainable %"), rows)
    return 0
