"""`peftkit predict`: label a JSONL/CSV/TSV file (or stdin) with an adapter, streaming in constant memory.

Rows are read lazily and processed `--batch-size` at a time through the same `data.encode` and
`inference.predict_logits` the training loop evaluates with, so predictions match evaluation exactly.
Each output row is the input row's fields plus label, label_name and probabilities, as JSON lines or CSV (by the
--output suffix). The output file is written beside its final name and renamed into place at the end (atomic).
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from peftkit.artifacts import LoadedAdapter
from peftkit.data import encode
from peftkit.errors import PeftkitError
from peftkit.inference import format_predictions, predict_logits
from peftkit.io import atomic_open
from peftkit.validation import TABLE_SUFFIXES, iter_rows, row_texts


def normalise(where: str, row: dict[str, Any], text_field: str, pair_field: str | None) -> dict[str, Any]:
    """Map a user's row onto encode's {'text', 'text_pair'?} shape with training's own text checks, accepting the
    normalised names when the trained ones are absent."""

    def present(field: str, fallback: str) -> str:
        return fallback if field not in row and fallback in row else field

    pair = present(pair_field, "text_pair") if pair_field else None
    if pair is None and "text_pair" in row:  # as serve's 422: a pair would be dropped, the row scored as a single
        raise PeftkitError(
            f"{where} has a text_pair but the adapter classifies single texts (its input field: {text_field}); "
            "drop text_pair, or use an adapter trained on sentence pairs"
        )
    return row_texts(row, where, present(text_field, "text"), pair, allow_empty=True)


PREDICTION_FIELDS = ("label", "label_name", "probabilities")  # what format_predictions gives each row
OUTPUT_SUFFIXES = (".jsonl", *TABLE_SUFFIXES)  # the suffixes predict reads, written the same way


def output_format(path: str) -> str:
    """'jsonl', 'csv' or 'tsv', by the --output suffix ('-', stdout, is JSONL); any other suffix is refused."""
    suffix = ".jsonl" if path == "-" else Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise PeftkitError(
            f"--output {path}: predictions are written as {', '.join(OUTPUT_SUFFIXES)} (by the file's suffix), "
            f"got {suffix or 'no suffix'}"
        )
    return suffix[1:]


def output_row(where: str, row: dict[str, Any], prediction: dict[str, Any]) -> dict[str, Any]:
    """The input row's fields, then the prediction's; an input field named like a prediction field is kept as
    input_<name> (a labelled file keeps its gold label beside the predicted one)."""
    kept = {}
    for key, value in row.items():
        name = f"input_{key}" if key in PREDICTION_FIELDS else key
        if name != key and name in row:
            raise PeftkitError(f"{where} has both {key!r} and {name!r}; rename one (prediction fields: {key})")
        kept[name] = value
    return {**kept, **prediction}


class CsvWriter:
    """Output rows as CSV: the first row's fields are the header, probabilities one column per label name
    (probabilities.<name>); a later row with a field the header lacks is refused, never dropped."""

    def __init__(self, out: IO[str], delimiter: str = ","):
        self.out, self.writer, self.delimiter = out, None, delimiter

    def write(self, where: str, row: dict[str, Any]) -> None:
        flat = {k: v for k, v in row.items() if k != "probabilities"}
        flat.update({f"probabilities.{name}": p for name, p in row["probabilities"].items()})
        if self.writer is None:
            self.writer = csv.DictWriter(self.out, fieldnames=list(flat), restval="", delimiter=self.delimiter)
            self.writer.writeheader()
        extra = [k for k in flat if k not in self.writer.fieldnames]
        if extra:
            raise PeftkitError(
                f"{where} has field {', '.join(extra)} that the first row lacks; a CSV output has the first row's "
                "columns, so write .jsonl for rows with varying fields"
            )
        self.writer.writerow(
            {k: "" if v is None else v if isinstance(v, str) else json.dumps(v) for k, v in flat.items()}
        )


def predict_rows(
    loaded: LoadedAdapter, rows: list[dict[str, Any]], batch_size: int, bf16: bool | None = None
) -> list[dict[str, Any]]:
    """Prediction dicts for already normalised rows: label, label_name, probabilities by label name. `bf16`:
    autocast or not; None = where it pays (`precision.resolve_bf16`, the rule serve follows too)."""
    if not rows:
        return []
    split = encode(rows, loaded.tokenizer, loaded.meta.task.max_length)
    device = next(loaded.model.parameters()).device
    logits = predict_logits(loaded.model, split, batch_size, device, bf16)
    check_finite(logits, str(loaded.directory or loaded.meta.task.name))
    return format_predictions(logits, loaded.label_names)


def predict_texts(
    loaded: LoadedAdapter,
    texts: list[str],
    text_pairs: list[str] | None = None,
    batch_size: int = 64,
    bf16: bool | None = None,
) -> list[dict[str, Any]]:
    """`LoadedAdapter.predict`: `peftkit predict` for texts given in code, through the same normalise and
    predict_rows, so each dict equals the CLI's prediction fields for that row (label, label_name, probabilities),
    in input order. A list of texts is checked as a whole before anything runs: one line names the bad one."""
    adapter = str(loaded.directory or loaded.meta.task.name)
    for name, values in (("texts", texts), ("text_pairs", text_pairs)):
        if values is not None and (isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple))):
            one = f" (one text: [{name[:-1]}])" if isinstance(values, str) else ""
            raise PeftkitError(f"{name} must be a list of strings{one}, got {type(values).__name__}")
    text_field, pair_field = loaded.meta.task.input_fields
    if pair_field and text_pairs is None:
        raise PeftkitError(f"adapter {adapter} classifies sentence pairs: pass text_pairs, one per text")
    if text_pairs is not None and not pair_field:
        raise PeftkitError(f"adapter {adapter} classifies single texts: drop text_pairs, or use a pair adapter")
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise PeftkitError(f"text_pairs has {len(text_pairs)} entries and texts {len(texts)}; give one pair per text")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PeftkitError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
    if bf16 is not None and not isinstance(bf16, bool):
        raise PeftkitError(f"bf16 must be true, false or None (where it pays), got {bf16!r}")
    pairs = [{} for _ in texts] if text_pairs is None else [{"text_pair": p} for p in text_pairs]
    rows = [{"text": text, **pair} for text, pair in zip(texts, pairs)]
    items = [normalise(f"text {i}", row, text_field, pair_field) for i, row in enumerate(rows)]
    return predict_rows(loaded, items, batch_size, bf16)


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
    bf16: bool | None = None,
    progress: bool = True,
    stdin: IO[str] | None = None,
    fmt: str = "jsonl",
) -> int:
    """Read, predict and write `batch_size` rows at a time as `fmt` (output_format); returns the number of rows
    written. An input without rows is refused: an empty output would look like a result."""
    from tqdm.auto import tqdm

    csv_writer = CsvWriter(out, TABLE_SUFFIXES[f".{fmt}"] or ",") if f".{fmt}" in TABLE_SUFFIXES else None

    text_field, pair_field = loaded.meta.task.input_fields
    written = 0
    bar = tqdm(desc="predict", unit="row", disable=not progress, file=sys.stderr, dynamic_ncols=True, delay=1.0)
    chunk: list[tuple[str, dict[str, Any]]] = []

    def flush() -> None:
        nonlocal written
        items = [normalise(where, row, text_field, pair_field) for where, row in chunk]
        for (where, row), prediction in zip(chunk, predict_rows(loaded, items, batch_size, bf16)):
            result = output_row(where, row, prediction)
            if csv_writer:
                csv_writer.write(where, result)
            else:
                out.write(json.dumps(result) + "\n")
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
    if not written:
        raise PeftkitError(f"nothing to predict in {'stdin' if source == '-' else source}: it has no rows")
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
