"""The `peftkit` command: recipes, train, eval, bench, export, merge, predict, serve.

User mistakes (PeftkitError) print one line and exit 2; nothing prints a traceback for them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from peftkit.errors import PeftkitError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except PeftkitError as e:
        print(f"peftkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftkit: interrupted; files written so far are complete (all writes are atomic)", file=sys.stderr)
        return 130


def quiet_libraries() -> None:
    """Keep the terminal for our own output: transformers' load reports and deprecation chatter add nothing here."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers configures its logger
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning: one loop, many methods.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.add_argument("--no-params", action="store_true", help="skip the trainable-%% column (faster)")
    p.set_defaults(handler=cmd_recipes)

    p = sub.add_parser("methods", help="list the registered adaptation methods")
    p.set_defaults(handler=cmd_methods)

    p = sub.add_parser("train", help="train a recipe: peftkit train sst2-lora train.max_steps=200")
    p.add_argument("recipe", nargs="?", help="recipe name (see `peftkit recipes`)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 method.r=16")
    p.add_argument("--config", help="your own recipe YAML instead of a built-in name")
    p.add_argument("--data-dir", help="folder holding task folders (default: $PEFTKIT_DATA, else the Hugging Face Hub)")
    p.add_argument("--run-dir", help="where to write the run (default: runs/<recipe>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("eval", help="evaluate a finished run on a split")
    p.add_argument("run_dir")
    p.add_argument("--split", default="validation")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("bench", help="train methods x tasks and write accuracy/params/memory/time tables")
    p.add_argument("--tasks", help="comma-separated tasks (default: the profile's)")
    p.add_argument("--methods", help="comma-separated methods (default: the profile's)")
    p.add_argument("--profile", default="cpu", help="smoke, cpu or full")
    p.add_argument("--seeds", help="comma-separated seeds (default: the profile's)")
    p.add_argument("--out", help="results folder (default: benchmarks/results/<profile>)")
    p.add_argument("--data-dir")
    p.add_argument("--model", help="base model (default: the recipes')")
    p.add_argument("--report", metavar="DIR", help="only rebuild tables and plots from the cell files in DIR")
    p.set_defaults(handler=lambda a: _lazy("peftkit.bench", "bench_cli")(a))

    p = sub.add_parser("export", help="export a run's adapter (or --merge it into a full model)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="store_true", help="write a merged full transformers model instead")
    p.add_argument("--allow-base-mismatch", action="store_true")
    p.set_defaults(handler=lambda a: _lazy("peftkit.export", "export_cli")(a))

    p = sub.add_parser("merge", help="combine LoRA adapters of one base (peft weighted adapter merge)")
    p.add_argument("adapters", nargs="+")
    p.add_argument("--weights", required=True, help="comma-separated, one per adapter")
    p.add_argument("--how", default="linear", help="linear, ties or cat (cat keeps each rank; linear/ties need equal ranks)")
    p.add_argument("--density", type=float, default=0.5, help="ties: share of weights kept")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=lambda a: _lazy("peftkit.export", "merge_cli")(a))

    p = sub.add_parser("predict", help="label a JSONL/CSV file (or - for stdin) with an adapter")
    p.add_argument("adapter_dir")
    p.add_argument("--input", required=True)
    p.add_argument("--output", default="-")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    p.add_argument("--allow-base-mismatch", action="store_true")
    p.set_defaults(handler=lambda a: _lazy("peftkit.predict", "predict_cli")(a))

    p = sub.add_parser("serve", help="serve many adapters on one base model over HTTP")
    p.add_argument("--base", default="default")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--admin-token", help="enables POST/DELETE /v1/adapters with this bearer token")
    p.add_argument("--max-batch", type=int, default=64, help="most texts in one request")
    p.add_argument("--max-chars", type=int, default=10000, help="longest text accepted")
    p.add_argument("--allow-base-mismatch", action="store_true")
    p.set_defaults(handler=lambda a: _lazy("peftkit.serve", "serve_cli")(a))
    return parser


def _lazy(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------------------------- commands


def cmd_recipes(args) -> int:
    from peftkit.config import list_recipes, load_config

    rows = []
    for name in list_recipes():
        cfg = load_config(recipe=name)
        pct = "" if args.no_params else _trainable_pct(cfg)
        rows.append((name, cfg.task.name, cfg.method.name, pct))
    print_table(("recipe", "task", "method", "trainable %"), rows)
    return 0


def _trainable_pct(cfg) -> str:
    """Apply the recipe's method to a weightless (meta-device) copy of its model and count parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from peftkit.adapters import MethodContext, build_method
    from peftkit.data import BUILTIN_TASKS
    from peftkit.modeling import count_parameters, head_modules, resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path)
    num_labels = BUILTIN_TASKS[cfg.task.name].num_labels if cfg.task.name in BUILTIN_TASKS else 2
    try:
        model_config = AutoConfig.from_pretrained(path, num_labels=num_labels)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(model_config)
            ctx = MethodContext(path, head_modules(model), total_steps=1000)
            model = build_method(cfg.method.name, cfg.method.options).apply(model, ctx)
        return f"{count_parameters(model).trainable_pct:.3f}"
    except Exception:  # noqa: BLE001 (a listing must not fail because one recipe's model is not available offline)
        return "?"


def cmd_methods(args) -> int:
    from peftkit.adapters import available_methods, get_method_class

    rows = []
    for name in available_methods():
        cls = get_method_class(name)
        rows.append((name, "peft" if cls.uses_peft else "peftkit", "yes" if cls.merge_blocker is None else "no",
                     (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]))
    print_table(("method", "weights format", "merge", "what it is"), rows)
    from peftkit.adapters.peft_generic import unsupported_peft_types

    print("\npeft types that cannot work on an encoder classifier (method peft refuses them):")
    print_table(("peft_type", "why"), unsupported_peft_types())
    return 0


def cmd_train(args) -> int:
    from peftkit.config import load_config
    from peftkit.train import train

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise PeftkitError(f"{run_dir} is not a run folder (no config.yaml)")
        config = load_config(config_file=str(run_dir / "config.yaml"), overrides=args.overrides + ([args.recipe] if args.recipe else []))
    elif args.config and args.recipe and "=" not in args.recipe:
        raise PeftkitError(f"give a recipe name or --config FILE, not both (got {args.recipe!r} and --config {args.config})")
    elif args.config:  # argparse puts the first override into the recipe slot
        config = load_config(config_file=args.config, overrides=([args.recipe] if args.recipe else []) + args.overrides)
    else:
        config = load_config(recipe=args.recipe, overrides=args.overrides)
    if args.data_dir:
        config.task.data_dir = args.data_dir
    summary = train(config, run_dir=args.run_dir, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0
    best = summary["best"]
    metrics = ", ".join(f"{k} {best[k]:.4f}" for k in ("accuracy", "macro_f1", "f1") if k in best)
    print(f"{summary['recipe']}: validation {metrics} (step {best['step']}); "
          f"{summary['trainable_params']:,} trainable params ({summary['trainable_pct']:.3f}%); "
          f"{summary['train_seconds']:.1f}s, {summary['train_examples_per_s']:.1f} examples/s; run: {summary['run_dir']}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from peftkit.artifacts import load
    from peftkit.config import load_config
    from peftkit.data import encode, load_task
    from peftkit.inference import evaluate

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").exists():
        raise PeftkitError(f"{run_dir} is not a run folder (no config.yaml)")
    config = load_config(config_file=str(run_dir / "config.yaml"))
    if args.data_dir:
        config.task.data_dir = args.data_dir
    loaded = load(run_dir / "adapter")
    task = load_task(config.task, seed=config.train.seed)
    rows = task.split(args.split)
    split = encode(rows, loaded.tokenizer, config.task.max_length)
    if split.labels is None:
        raise PeftkitError(f"split {args.split!r} of task {task.name!r} has no labels to evaluate against")
    metrics = evaluate(loaded.model, split, task.num_labels, args.batch_size, loaded.tokenizer.pad_token_id, torch.device("cpu"))
    print(json.dumps({"split": args.split, "examples": len(split), **metrics}, indent=2))
    return 0


def print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
