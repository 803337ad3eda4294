"""`peftkit combine A B --weights 0.5,0.5 --out AB`: one LoRA adapter from several (peft's weighted combination).

Not to be confused with `peftkit export --merge`, which folds one adapter into its base model.
"""

from __future__ import annotations

import argparse
import math

from peftkit.errors import PeftkitError

HELP = "combine LoRA adapters of one base into one (peft weighted adapter combination)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+")
    parser.add_argument("--weights", required=True, help="comma-separated, one per adapter")
    parser.add_argument(
        "--how", default="linear", help="linear, ties or cat (cat keeps each rank; linear/ties need equal ranks)"
    )
    parser.add_argument("--density", type=float, default=0.5, help="ties: share of weights kept")
    parser.add_argument("--out", required=True)


def run(args: argparse.Namespace) -> int:
    from peftkit.export import combine_adapters

    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise PeftkitError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    if not all(math.isfinite(w) for w in weights):
        raise PeftkitError(f"--weights must be finite numbers, got {args.weights!r}")
    out, note = combine_adapters(args.adapters, weights, args.how, args.density, args.out)
    print(f"wrote combined LoRA adapter {out} ({args.how}, weights {weights}); {note}")
    return 0
