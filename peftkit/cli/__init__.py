"""The `peftkit` command. One module per verb in this package (as torchtune's `_cli/`), each with:

    HELP                      one line for `peftkit --help`
    add_arguments(parser)     its flags (argparse), imported cheaply: no torch at parse time
    run(args) -> int          parse-level checks, then one call into the library with typed arguments

User mistakes (PeftkitError) print one line and exit 2; nothing prints a traceback for them.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from peftkit.console import quiet_libraries
from peftkit.errors import PeftkitError

VERBS = ("recipes", "methods", "train", "eval", "bench", "export", "combine", "predict", "serve")


def error_line(message: str) -> str:
    """The one form every user mistake is printed in, usage mistakes included."""
    return f"peftkit: error: {message}"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (like every other peftkit error) and exit 2, and a value that starts
    like a negative number is a value (`--weights -1,0.5`), as in Python 3.13's argparse."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")  # 3.11's only takes one plain number such as -1

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, error_line(f"{message} (see {self.prog} --help)") + "\n")  # prog: `peftkit VERB`


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="peftkit", description="Parameter-efficient fine-tuning: one loop, many methods.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in VERBS:
        module = importlib.import_module(f"peftkit.cli.{verb}")
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        # `train RECIPE --run-dir D key=value`: argparse stops filling a positional list at the first flag
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    quiet_libraries()
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except PeftkitError as e:
        print(error_line(str(e)), file=sys.stderr)
        return 2
    except BrokenPipeError:  # `peftkit recipes | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("peftkit: interrupted; files written so far are complete (all writes are atomic)", file=sys.stderr)
        return 130


__all__ = ["VERBS", "build_parser", "main"]
