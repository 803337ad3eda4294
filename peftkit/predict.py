"""`peftkit predict`: label a JSONL/CSV file (or stdin) with an adapter, streaming in constant memory.

Rows are read lazily and processed `--batch-size` at a time through the same `data.encode` and
`inference.predict_logits` the training loop evaluates with, so predictions match evaluation exactly.
The output file is written beside its final name and renamed into place at the end (atomic).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

from peftkit.artifacts import LoadedAdapter
from peftkit.data import encode
from peftkit.errors import PeftkitError
from peftkit.inference import format_predictions, predict_logits
from peftkit.io import atomic_open
from peftkit.validation import iter_rows, row_texts


def normalise(where: str, row: dict[str, Any], text_field: str, pair_field: str | None) -> dict[str, Any]:
    """Map a user's row onto encode's {'text', 'text_pair'?} shape with training's own text checks, accepting the
    normalised names when the trained ones are absent."""

    def present(field: str, fallback: str) -> str:
        return fallback if field not in row and fallback in row else field

    pair = present(pair_field, "text_pair") if pair_field else None
    return row_texts(row, where, present(text_field, "text"), pair, allow_empty=True)


def predict_rows(
    loaded: LoadedAdapter, rows: list[dict[str, Any]], batch_size: int, bf16: bool = False
) -> list[dict[str, Any]]:
    """Prediction dicts for already normalised rows: label, label_name, probabilities by label name."""
    if not rows:
        return []
    split = encode(rows, loaded.tokenizer, loaded.meta.task.max_length)
    device = next(loaded.model.parameters()).device
    logits = predict_logits(loaded.model, split, batch_size, device, bf16)
    check_finite(logits, str(loaded.directory or loaded.meta.task.name))
    return format_predictions(logits, loaded.label_names)


class BrokenAdapterError(PeftkitError):
    """The adapter produced NaN or infinite outputs: its weights are broken, not the input."""


def check_finite(logits: Any, adapter: str) -> None:
    """Refuse to turn non-finite logits into probabilities (JSON has no NaN, and a NaN adapter is broken)."""
    import torch

    if not bool(torch.isfinite(logits).all()):
        raise BrokenAdapterError(
            f"adapter {adapter} produced non-finite outputs (NaN or inf); the adapter is broken "
            "(e.g. trained with a diverging learning rate); retrain or re-export it"
        )


CHUNK_BATCHES = 32  # batches read per chunk: predict_logits sorts a chunk by length; memory stays constant


def predict_stream(
    loaded: LoadedAdapter,
    source: str,
    out: IO[str],
    batch_size: int = 64,
    bf16: bool = False,
    progress: bool = True,
    stdin: IO[str] | None = None,
) -> int:
    """Read, predict and write `batch_size` rows at a time; returns the number of rows written."""
    from tqdm.auto import tqdm

    text_field, pair_field = loaded.meta.task.input_fields
    written = 0
    bar = tqdm(desc="predict", unit="row", disable=not progress, file=sys.stderr, dynamic_ncols=True, delay=1.0)
    chunk: list[tuple[str, dict[str, Any]]] = []

    def flush() -> None:
        nonlocal written
        items = [normalise(where, row, text_field, pair_field) for where, row in chunk]
        for (_, row), prediction in zip(chunk, predict_rows(loaded, items, batch_size, bf16)):
            if "id" in row:
                prediction = {"id": row["id"], **prediction}
            out.write(json.dumps(prediction) + "\n")
        written += len(chunk)
        bar.update(len(chunk))
        chunk.clear()

    with bar:
        for item in iter_rows(source, stdin, what="input"):
            chunk.append(item)
            if len(chunk) >= batch_size * CHUNK_BATCHES:
                flush()
        if chunk:
            flush()
    return written


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[IO[str]]:
    """stdout for '-', else a temp file beside `path` renamed over it only when every row is written."""
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_open(path) as f:
        yield f
