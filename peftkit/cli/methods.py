"""`peftkit methods`: the registered adaptation methods, their weights format and whether they merge."""

from __future__ import annotations

import argparse
import sys

HELP = "list the registered adaptation methods"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from peftkit.adapters import available_methods, get_method_class
    from peftkit.console import print_table
    from peftkit.errors import PeftkitError

    rows = []
    for name in available_methods():
        try:
            cls = get_method_class(name)
        except PeftkitError as e:  # a broken plugin is listed as such; the other methods still are
            rows.append((name, "?", "?", f"(cannot be used: {e})"))
            continue
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
        rows.append(
            (
                name,
                "peft" if cls.uses_peft else "peftkit",
                "yes" if cls.merge_blocker is None else "no",
                doc.splitlines()[0] if doc else "(no description)",
            )
        )
    print_table(("method", "weights format", "merge", "what it is"), rows)
    from peftkit.adapters.peft_generic import unsupported_peft_types

    print("\npeft types that cannot work on an encoder classifier (method peft refuses them):")
    print_table(("peft_type", "why"), unsupported_peft_types())
    return 0
