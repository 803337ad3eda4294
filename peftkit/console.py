"""Terminal output shared by the CLI, the loop and the bench: quiet libraries, progress bars, plain tables."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Keep the terminal for our own output: transformers' load reports and deprecation chatter add nothing here."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers configures its logger
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # bitsandbytes, imported by peft, asks `kernels` (a transformers dependency since 5.25) for a Hub kernel on CPUs
    # with AVX512-BF16; both log a warning on every command when that fails (offline), which peftkit never needs.
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "", unit: str = "step", **kwargs):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)


def print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
