"""`peftkit train RECIPE [section.key=value ...]`: resolve a recipe (or --config FILE), then train it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from peftkit.errors import PeftkitError

HELP = "train a recipe: peftkit train sst2-lora train.max_steps=200"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe name (see `peftkit recipes`)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 method.r=16")
    parser.add_argument("--config", help="your own recipe YAML instead of a built-in name")
    parser.add_argument(
        "--data-dir", help="folder holding task folders (default: $PEFTKIT_DATA, else the Hugging Face Hub)"
    )
    parser.add_argument("--run-dir", help="where to write the run (default: runs/<recipe>-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the resolved config and print it; load nothing"
    )


def run(args: argparse.Namespace) -> int:
    from peftkit.recipe_files import load_config

    overrides = list(args.overrides)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise PeftkitError(f"{run_dir} is not a run folder (no config.yaml)")
        config = load_config(
            config_file=str(run_dir / "config.yaml"), overrides=([args.recipe] if args.recipe else []) + overrides
        )
    elif args.config and args.recipe and "=" not in args.recipe:
        raise PeftkitError(
            f"give a recipe name or --config FILE, not both (got {args.recipe!r} and --config {args.config})"
        )
    elif args.config:  # argparse puts the first override into the recipe slot
        config = load_config(config_file=args.config, overrides=([args.recipe] if args.recipe else []) + overrides)
    else:
        config = load_config(recipe=args.recipe, overrides=overrides)
    if args.data_dir:
        config.task.data_dir = args.data_dir
    if args.dry_run:  # as the run would record it: local paths absolute
        from peftkit.adapters import build_method
        from peftkit.local_paths import resolve_local_paths
        from peftkit.loop import check_method_fits

        check_method_fits(config, build_method(config.method.name, config.method.options))
        print(resolve_local_paths(config).to_yaml(), end="")
        return 0

    from peftkit.loop import train

    summary = train(config, run_dir=args.run_dir, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0
    best = summary.best

    def scores(metrics: dict[str, float]) -> str:
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "macro_f1", "f1") if k in metrics)

    # with a dev split, `best` is the dev score that chose the kept step; validation was scored once, after
    chosen = f"; dev {scores(best)}" if summary.selection_split == "dev" and summary.validation else ""
    print(
        f"{summary.recipe}: validation {scores(summary.validation or best)}{chosen} (kept step {best['step']}); "
        f"{summary.trainable_params:,} trainable params ({summary.trainable_pct:.3f}%); "
        f"{summary.train_seconds:.1f}s, {summary.train_examples_per_s:.1f} examples/s; run: {summary.run_dir}"
    )
    if summary.extra.get("skipped_rows"):
        print(
            f"skipped {summary.extra['skipped_rows']} bad rows (task.on_bad_row=skip), first: "
            f"{', '.join(summary.extra['skipped_rows_first'][:3])}"
        )
    return 0
