"""One exception type for every user mistake, so the CLI can print one line and exit 2."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from typing import Any


class PeftkitError(Exception):
    """A problem the user can fix (bad name, bad value, bad file). Printed without a traceback."""


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> PeftkitError:
    """Build the standard 'unknown X' error, naming close matches first and then every valid choice."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listing = ", ".join(choices) if len(choices) <= 40 else ", ".join(choices[:40]) + ", ..."
    return PeftkitError(f"unknown {kind} {name!r}.{hint} Valid: {listing}")


def short_error(e: BaseException, limit: int = 300) -> str:
    """`TypeName: first line of the message` (cut at `limit` characters), for wrapping a library's exception
    (peft, safetensors, torch) into a one-line PeftkitError."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {first[:limit]}"


def short_value(value: Any, limit: int = 60) -> str:
    """A value as JSON text, cut at `limit` characters, for naming a bad value in a one-line error."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."
