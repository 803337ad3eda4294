"""Data checks that name the file and line: row readers (JSONL, CSV with a sniffed or given dialect, any declared
encoding), text and label checks, `meta.json`, and the per-task rules (labels on every train/validation row, at
least two classes in train, known validation labels). With `task.on_bad_row: skip` an invalid row is dropped and
counted instead of stopping the run; file-level problems (encoding, not JSON, empty split) always stop it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from peftkit.errors import PeftkitError, did_you_mean, short_value, unknown_choice

CSV_DELIMITERS = ",;\t|"
# files read as delimited tables, with the delimiter their suffix implies (None: sniffed from the file); any other
# file is JSON lines. A .tsv is a table like a .csv, not JSON lines read line by line into 'not valid JSON'
TABLE_SUFFIXES: dict[str, str | None] = {".csv": None, ".tsv": "\t"}


class Row(dict):
    """A data row that remembers where it came from (`file:line`), so later checks can name it."""

    where: str = ""

    @classmethod
    def at(cls, where: str, data: dict[str, Any]) -> Row:
        row = cls(data)
        row.where = where
        return row


class BadRow(PeftkitError):
    """One row is invalid; with `task.on_bad_row: skip` it is dropped and counted, otherwise it stops the run."""


# --------------------------------------------------------------------------------------------- reading


def iter_rows(
    source: str | Path,
    stdin: IO[str] | None = None,
    what: str = "data",
    encoding: str = "utf-8",
    delimiter: str | None = None,
    bad_rows: list[str] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (`file:line`, row) from a JSONL or CSV/TSV file, or '-' for JSONL on stdin, one row at a time.

    A row that cannot be parsed raises BadRow, unless `bad_rows` is a list: then its location is appended there
    and reading continues. Undecodable bytes always stop with the file, line and the encoding that was tried.
    """
    import sys

    if str(source) == "-":
        yield from _jsonl_rows(stdin or sys.stdin, "<stdin>", bad_rows)
        return
    path = Path(source)
    if path.is_dir():
        raise PeftkitError(f"{what} file {path} is a directory, not a JSONL/CSV/TSV file")
    if not path.is_file():
        raise PeftkitError(f"{what} file {path} does not exist")
    # utf-8-sig: the same decoding, minus the byte-order mark spreadsheet programs put in front of the header
    opened_as = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    table = path.suffix.lower() in TABLE_SUFFIXES
    try:
        with path.open(newline="" if table else None, encoding=opened_as) as f:
            if table:
                yield from _csv_rows(f, str(path), delimiter or TABLE_SUFFIXES[path.suffix.lower()], bad_rows)
            else:
                yield from _jsonl_rows(f, str(path), bad_rows)
    except UnicodeDecodeError as e:
        line = _line_of_byte(path, e.start)
        hint = " (set task.encoding, e.g. task.encoding=latin-1)" if what == "data" else " (save it as UTF-8)"
        raise PeftkitError(
            f"{path}:{line} is not valid {encoding} text: byte 0x{e.object[e.start]:02x} at offset {e.start}{hint}"
        ) from None
    except csv.Error as e:
        raise PeftkitError(f"{path} is not a readable CSV file ({e})") from None


def _line_of_byte(path: Path, offset: int) -> int:
    """1-based line of a byte offset reported by a decoder (the offset counts from the current decode chunk, so
    this is the first line that fails to decode, found by reading the raw bytes)."""
    data = path.read_bytes()
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return number
    return data[:offset].count(b"\n") + 1


def _jsonl_rows(lines: Iterable[str], name: str, bad_rows: list[str] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadRow(f"{where} is not valid JSON ({e.msg})") from None
            except RecursionError:
                raise BadRow(f"{where} is nested too deeply to be a data row") from None
            if not isinstance(row, dict):
                raise BadRow(f"{where} is not a JSON object (one object per line expected)")
        except BadRow:
            if bad_rows is None:
                raise
            bad_rows.append(where)
            continue
        yield where, row


def _csv_rows(
    f: IO[str], name: str, delimiter: str | None, bad_rows: list[str] | None
) -> Iterator[tuple[str, dict[str, Any]]]:
    if delimiter is None:
        sample = f.read(65536)
        f.seek(0)
        try:
            delimiter = csv.Sniffer().sniff(sample, delimiters=CSV_DELIMITERS).delimiter
        except csv.Error:
            delimiter = ","
        if delimiter != "," and delimiter not in sample.partition("\n")[0]:
            delimiter = ","  # the header line decides: a stray ';' in the texts is not a dialect
    reader = csv.reader(f, delimiter=delimiter)
    header = _next_cells(reader)
    if header is None:
        return
    if len(set(header)) != len(header):
        raise PeftkitError(f"{name}:1: the CSV header repeats a column name: {header!r}")
    while (cells := _next_cells(reader)) is not None:
        where = f"{name}:{reader.line_num}"
        if not cells:
            continue
        try:
            if len(cells) > len(header):
                raise BadRow(
                    f"{where} has {len(cells)} cells but the header has {len(header)} "
                    f"(delimiter {delimiter!r}; set task.delimiter if that is wrong)"
                )
        except BadRow:
            if bad_rows is None:
                raise
            bad_rows.append(where)
            continue
        yield where, dict(zip(header, cells))  # a short row lacks its last cells: checked as a missing field


CSV_FIELD_LIMIT = 2**31 - 1  # the largest a C long holds everywhere; the tokenizer truncates long texts anyway


def _next_cells(reader) -> list[str] | None:
    """The reader's next row (None at the end), with no cap on a cell's size. The csv module's cap (131,072
    characters by default, JSONL has none) is process-wide state: raised only for this read, then put back, so
    a library user's own csv reading keeps whatever limit they set."""
    previous = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        return next(reader, None)
    finally:
        csv.field_size_limit(previous)


def read_rows(
    path: Path, encoding: str = "utf-8", delimiter: str | None = None, bad_rows: list[str] | None = None
) -> list[Row]:
    rows = iter_rows(path, encoding=encoding, delimiter=delimiter, bad_rows=bad_rows)
    return [Row.at(where, row) for where, row in rows]


def read_meta(folder: Path) -> dict[str, Any]:
    """A task folder's meta.json (optional): a JSON object whose label_names, if present, is a list."""
    path = folder / "meta.json"
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PeftkitError(f"{path} is not valid JSON ({reason})") from None
    if not isinstance(meta, dict):
        raise PeftkitError(f'{path} must hold a JSON object (e.g. {{"label_names": ["neg", "pos"]}})')
    if "label_names" in meta:
        check_label_names(meta["label_names"], f"{path}: label_names")
    if not isinstance(meta.get("fields", {}), (dict, list)):
        raise PeftkitError(f"{path}: fields must be a mapping or list, got {meta['fields']!r}")
    return meta


# --------------------------------------------------------------------------------------------- values


def check_label_names(names: Any, what: str) -> list[str]:
    """`what` names where the list was set (e.g. `task.label_names`, `meta.json: label_names`)."""
    if not isinstance(names, list) or not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names):
        raise PeftkitError(f"{what} must be a list of strings, got {names!r}")
    if len(names) < 2:
        raise PeftkitError(f"{what} must name at least 2 classes, got {names!r}")
    if len({str(n) for n in names}) != len(names):
        raise PeftkitError(f"{what} has duplicates: {names!r}")
    return [str(n) for n in names]


def check_text(value: Any, field: str, where: str, allow_empty: bool = False) -> str:
    """A text cell must be a string of valid Unicode, non-empty after strip unless empty texts are allowed."""
    if value is None:
        raise BadRow(f"{where}: {field!r} is null (a text is required)")
    if not isinstance(value, str):
        raise BadRow(f"{where}: {field!r} must be a string, got {type(value).__name__} {short_value(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRow(
            f"{where}: {field!r} holds an invalid character (lone surrogate {value[e.start]!r} at {e.start})"
        ) from None
    if not allow_empty and not value.strip():
        raise BadRow(f"{where}: {field!r} is empty (set task.allow_empty_text=true to keep empty texts)")
    return value


def is_label_value(label: Any) -> bool:
    """Labels are strings, integers or booleans; a float only when it is a whole number (1.0), never NaN."""
    if isinstance(label, (str, int)):  # bool is an int
        return True
    return isinstance(label, float) and math.isfinite(label) and label.is_integer()


def label_index(label: Any, index: dict[str, int], names: list[str], where: str, positions: bool = True) -> int:
    """The label's index in `names`: by name, else (with `positions`, for names the user or meta.json gave) an
    integer read as a position. Names read from the data are never positions: a label missing from them is a
    class train never had, not an index into them."""
    if not is_label_value(label):
        raise BadRow(f"{where}: label must be a string or an integer, got {type(label).__name__} {short_value(label)}")
    if isinstance(label, bool):
        label = int(label)
    if isinstance(label, float):
        label = int(label)
    if str(label) in index:  # a label name, also when names are numbers ("1".."5") read from the data
        return index[str(label)]
    if (
        positions
        and not all(map(is_number_name, names))
        and (isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()))
    ):
        value = int(label)
        if not 0 <= value < len(names):
            raise BadRow(f"{where}: label {value} is outside 0..{len(names) - 1} ({len(names)} label names)")
        return value
    error = unknown_choice(f"label in {where}", str(label), names)
    raise BadRow(str(error))


def distinct_labels(rows: list[dict], label_field: str) -> list[str]:
    """Sorted distinct valid labels (numbers numerically); invalid ones are reported later, by row."""
    values = {
        str(int(v) if isinstance(v, (bool, float)) else v)
        for r in rows
        if (v := r.get(label_field)) is not None and v != "" and is_label_value(v)
    }
    return sorted(values, key=lambda v: (not is_number_name(v), int(v) if is_number_name(v) else 0, v))


def is_number_name(name: str) -> bool:
    """A label name that is an integer ("3", "-1"): numbers read from the data, never positions in the names."""
    return name.lstrip("-").isdigit()


# --------------------------------------------------------------------------------------------- a task's rows


def normalise_splits(
    name: str,
    raw: dict[str, list[dict]],
    cfg,
    pair_field: str | None,
    label_names: list | None,
    bad_rows: list[str] | None = None,
    label_splits: tuple[str, ...] = ("train",),
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Rows of every split as {'text', 'text_pair'?, 'label'?}, checked; returns (splits, label names).

    `label_names` None: the sorted distinct labels of the rows kept in `label_splits`, read after the row checks
    so that a row dropped by `task.on_bad_row: skip` never adds a class. `bad_rows` (a list, with skip) collects
    the location of every dropped row.
    """
    for split in ("train", "validation"):
        if split in raw and not raw[split]:
            raise PeftkitError(f"task {name}: the {split} split has no rows (is the file empty?)")
    positions = label_names is not None  # given names take integer labels as positions; the data's never do
    if label_names is not None:
        label_names = check_label_names(label_names, f"task {name}: label_names")
    located = {
        split: [(getattr(row, "where", "") or f"{name}/{split} row {n}", row) for n, row in enumerate(rows, 1)]
        for split, rows in raw.items()
    }
    checked = {
        split: _kept(pairs, lambda where, row, split=split: _checked_row(row, where, split, cfg, pair_field), bad_rows)
        for split, pairs in located.items()
    }
    if label_names is None:
        label_names = distinct_labels([item for s in label_splits for _, item in checked.get(s, [])], "label")
    index = {n: i for i, n in enumerate(label_names)}

    def labelled(where: str, item: dict[str, Any]) -> dict[str, Any]:
        if "label" not in item:
            return item
        return {**item, "label": label_index(item["label"], index, label_names, where, positions)}

    kept = {split: _kept(pairs, labelled, bad_rows) for split, pairs in checked.items()}
    for split in ("train", "validation"):
        if split in kept and not kept[split]:
            raise PeftkitError(f"task {name}: every row of the {split} split was invalid and skipped")
    test = kept.get("test")
    if test and 0 < sum("label" in item for _, item in test) < len(test):
        first = next(where for where, item in test if "label" not in item)
        raise PeftkitError(f"task {name}: some test rows have a label and some do not (first without: {first})")
    splits = {split: [item for _, item in pairs] for split, pairs in kept.items()}
    check_train_classes(name, splits["train"], label_names)
    return splits, label_names


def check_train_classes(
    name: str, train: list[dict[str, Any]], label_names: list[str], after: str = "", fix: str = ""
) -> None:
    """Training on one class learns nothing yet finishes like a run that did: refuse it, naming the class, the
    setting that left train with it (`after`) and what to change (`fix`)."""
    classes = sorted({r["label"] for r in train})
    if len(classes) < 2:
        shown = ", ".join(label_names[c] for c in classes)
        raise PeftkitError(
            f"task {name}: the train split has {len(classes)} class ({shown}){after}; "
            f"a classifier needs at least 2 classes{f' ({fix})' if fix else ''}"
        )


def _kept(pairs: list[tuple[str, Any]], check, bad_rows: list[str] | None) -> list[tuple[str, Any]]:
    """(where, check(where, value)) for each pair; a BadRow stops the run or, given a `bad_rows` list, is
    recorded there and the row dropped."""
    kept = []
    for where, value in pairs:
        try:
            kept.append((where, check(where, value)))
        except BadRow:
            if bad_rows is None:
                raise
            bad_rows.append(where)
    return kept


def row_texts(row: dict, where: str, text_field: str, pair_field: str | None, allow_empty: bool) -> dict[str, str]:
    """A row's {'text', 'text_pair'?}: the same checks for training rows and for rows to predict."""
    for kind, field in (("text", text_field), ("text_pair", pair_field)):
        if field and field not in row:
            raise BadRow(
                f"{where}: the {kind} field (task.{kind}_field) {field!r} is missing; "
                f"fields: {', '.join(map(str, row)) or 'none'}.{did_you_mean(field, row)}"
            )
    item = {"text": check_text(row[text_field], text_field, where, allow_empty)}
    if pair_field:
        item["text_pair"] = check_text(row[pair_field], pair_field, where, allow_empty)
    return item


def _checked_row(row: dict, where: str, split: str, cfg, pair_field: str | None) -> dict[str, Any]:
    """The row's texts and its label as written (mapped to an index once the label names are known)."""
    item: dict[str, Any] = row_texts(row, where, cfg.text_field, pair_field, cfg.allow_empty_text)
    label = row.get(cfg.label_field)
    if label is None or (isinstance(label, str) and not label.strip()):
        if split in ("train", "validation"):
            fields = ""
            if cfg.label_field not in row:
                fields = f"; fields: {', '.join(map(str, row)) or 'none'}.{did_you_mean(cfg.label_field, row)}"
            raise BadRow(f"{where}: no {cfg.label_field!r} value (every {split} row needs a label){fields}")
    else:
        item["label"] = label
    return item
