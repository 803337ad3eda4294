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
    hint = did_you_mean(name, choices)
    listing = ", ".join(choices) if len(choices) <= 40 else ", ".join(choices[:40]) + ", ..."
    return PeftkitError(f"unknown {kind} {name!r}.{hint} Valid: {listing}")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'a', 'b'?' for up to 3 choices close to `name` ('' when none is), comparing without case or
    surrounding spaces, so a CSV header's 'Text ' is offered for 'text'."""
    by_key: dict[str, str] = {}
    for choice in choices:
        by_key.setdefault(str(choice).strip().casefold(), str(choice))
    close = difflib.get_close_matches(name.strip().casefold(), list(by_key), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(by_key[c]) for c in close)}?" if close else ""


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
