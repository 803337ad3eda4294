"""`peftkit eval RUN_DIR --split test`: score a finished run's adapter on a split of its task."""

from __future__ import annotations

import argparse
import json

from peftkit.errors import PeftkitError
from peftkit.user_metrics import METRIC_HELP

HELP = "evaluate a finished run on a split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--data-dir")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast on or off (default: as the run trained and evaluated, from its summary.json)",
    )
    parser.add_argument("--metric", action="append", default=[], metavar="PATH_OR_ID", help=METRIC_HELP)


def run(args: argparse.Namespace) -> int:
    from peftkit.inference import evaluate_run

    if args.batch_size < 1:
        raise PeftkitError(f"--batch-size must be at least 1, got {args.batch_size}")
    result = evaluate_run(
        args.run_dir,
        args.split,
        device=args.device,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        user_metrics=args.metric,
        bf16=args.bf16,
    )
    print(json.dumps(result.to_dict(), indent=2))
    return 0
