"""`peftkit predict ADAPTER --input rows.jsonl --output preds.jsonl`: label a file (or stdin) with an adapter."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peftkit.errors import PeftkitError

HELP = "label a JSONL/CSV/TSV file (or - for stdin) with an adapter"


def add_bf16_argument(parser: argparse.ArgumentParser) -> None:
    """predict's and serve's --bf16/--no-bf16: one flag, one default (peftkit.precision.resolve_bf16)."""
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast on or off (default: on where it pays: a CPU with AMX/AVX512-BF16, or a bf16 GPU)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir")
    parser.add_argument("--input", required=True)
    parser.add_argument(
        "--output",
        default="-",
        help="PREDS.jsonl, PREDS.csv or PREDS.tsv (default: JSON lines on stdout); each row keeps the input's fields "
        "and adds label, label_name and probabilities (CSV/TSV: a probabilities.<label> column each); an input field "
        "named like "
        "one of those is kept as input_<name>",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    add_bf16_argument(parser)
    parser.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold the adapter into the base first where the method allows (faster; default: on)",
    )
    parser.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--allow-base-mismatch", action="store_true")


def run(args: argparse.Namespace) -> int:
    from peftkit.artifacts import load
    from peftkit.predict import atomic_output, output_format, predict_stream

    if args.batch_size < 1:
        raise PeftkitError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.input != "-" and args.output != "-" and Path(args.input).resolve() == Path(args.output).resolve():
        raise PeftkitError("--output must differ from --input")
    if args.output != "-" and Path(args.output).is_dir():
        example = Path(args.output) / "preds.jsonl"
        raise PeftkitError(f"--output {args.output} is a directory; name a file (e.g. {example})")
    fmt = output_format(args.output)
    loaded = load(args.adapter_dir, base=args.base, allow_base_mismatch=args.allow_base_mismatch)
    if args.merge:
        loaded = loaded.merged()
    with atomic_output(args.output) as out:
        progress = sys.stderr.isatty() or args.output != "-"
        n = predict_stream(loaded, args.input, out, args.batch_size, args.bf16, progress=progress, fmt=fmt)
    if args.output != "-":
        print(f"wrote {n} predictions to {args.output}", file=sys.stderr)
    return 0
