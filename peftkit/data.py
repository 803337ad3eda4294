"""Tasks: where rows come from (a data folder, a user's JSONL/CSV/TSV file, or the Hugging Face Hub), tokenised once.

A task folder holds train.jsonl, validation.jsonl, optional test.jsonl and meta.json (label_names), with rows
{"text": ..., "label": ...} or, for sentence pairs, {"text": ..., "text_pair": ..., "label": ...}.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftkit import validation
from peftkit.config import TaskConfig
from peftkit.errors import PeftkitError, unknown_choice

DATA_ENV = "PEFTKIT_DATA"
SPLITS = ("train", "validation", "test")
TASK_FILE_SUFFIXES = (".jsonl", *validation.TABLE_SUFFIXES)


@dataclass(frozen=True)
class BuiltinTask:
    """Where a built-in task lives on the Hub when no data folder is set, and which metrics it reports."""

    hf_path: str
    hf_name: str | None
    text: str
    text_pair: str | None
    metrics: tuple[str, ...]
    num_labels: int


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "sst2": BuiltinTask("glue", "sst2", "sentence", None, ("accuracy",), 2),
    "banking77": BuiltinTask("PolyAI/banking77", None, "text", None, ("accuracy", "macro_f1"), 77),
    "financial_phrasebank": BuiltinTask(
        "takala/financial_phrasebank", "sentences_50agree", "sentence", None, ("accuracy", "macro_f1"), 3
    ),
    "rte": BuiltinTask("glue", "rte", "sentence1", "sentence2", ("accuracy",), 2),
    "mrpc": BuiltinTask("glue", "mrpc", "sentence1", "sentence2", ("accuracy", "f1"), 2),
}


@dataclass
class Task:
    """Rows of every split, normalised to {'text', 'text_pair'?, 'label'} with integer labels."""

    name: str
    label_names: list[str]
    is_pair: bool
    metrics: tuple[str, ...]
    splits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped_rows: list[str] = field(default_factory=list)  # `file:line` of rows dropped by task.on_bad_row=skip

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> list[dict[str, Any]]:
        if name not in self.splits:
            raise unknown_choice(f"split of task {self.name!r}", name, self.splits)
        return self.splits[name]

    def describe(self) -> dict[str, Any]:
        """What an adapter folder records about its task (enough to predict without the data)."""
        return {
            "name": self.name,
            "label_names": self.label_names,
            "is_pair": self.is_pair,
            "metrics": list(self.metrics),
        }


# --------------------------------------------------------------------------------------------- loading


def is_task_source(name: str, folder: str | None = None) -> bool:
    """True when `name` is an existing task folder or JSONL/CSV/TSV file rather than a built-in task name, or a task
    folder in the data folder (`folder`, else $PEFTKIT_DATA), where load_task finds it by name too."""
    path = Path(name).expanduser()
    root = data_dir(TaskConfig(data_dir=folder))
    folders = [path, *([root / name] if root is not None else [])]
    return (path.is_file() and path.suffix.lower() in TASK_FILE_SUFFIXES) or any(
        f.is_dir() and (f / "train.jsonl").exists() for f in folders
    )


def task_names(folder: str | None = None) -> list[str]:
    """The task names load_task accepts here, for 'unknown task' errors: the built-in ones and the task folders in
    the data folder (`folder`, else $PEFTKIT_DATA), so a typo of a user's own task folder is named too."""
    root = data_dir(TaskConfig(data_dir=folder))
    found = [f.name for f in root.iterdir() if (f / "train.jsonl").is_file()] if root and root.is_dir() else []
    return sorted({*BUILTIN_TASKS, *found})


def is_path_task(name: str) -> bool:
    """True when load_task reads `name` as a path (a .jsonl/.csv/.tsv file, or a folder with train/validation.jsonl),
    not as a built-in task's name: the one rule for both, so a path made absolute is read as the same task."""
    path = Path(name).expanduser()
    return path.suffix.lower() in TASK_FILE_SUFFIXES or (
        path.is_dir() and any((path / f"{split}.jsonl").exists() for split in ("train", "validation"))
    )


def data_dir(cfg: TaskConfig) -> Path | None:
    value = cfg.data_dir or os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def load_task(cfg: TaskConfig, seed: int = 0) -> Task:
    """Find the task named by `cfg.name` and read its splits. `seed` (train.seed) draws only the train subsample;
    every row that is scored (held-out validation/test, dev, the max_eval_examples samples) is drawn by
    `cfg.dev_seed`, so runs that differ in train.seed are scored on the same rows."""
    path = Path(cfg.name).expanduser()
    root = data_dir(cfg)
    bad: list[str] | None = [] if cfg.on_bad_row == "skip" else None  # `file:line` of rows skipped
    if cfg.label_names is not None:  # set, even to [], is a choice to check: never read as 'take the data's'
        validation.check_label_names(cfg.label_names, "task.label_names")
    if path.suffix.lower() in TASK_FILE_SUFFIXES:
        task = _file_task(cfg, path, bad)
    elif is_path_task(cfg.name):
        task = _folder_task(cfg, path, bad)
    elif root is not None and (root / cfg.name).is_dir():
        task = _folder_task(cfg, root / cfg.name, bad)
    elif cfg.name in BUILTIN_TASKS and root is None:
        task = _hub_task(cfg, BUILTIN_TASKS[cfg.name], bad)
    elif path.is_dir():  # not a task folder: _folder_task names what it lacks
        task = _folder_task(cfg, path, bad)
    elif path.is_file():
        suffixes = ", ".join(TASK_FILE_SUFFIXES)
        raise PeftkitError(f"task file {path} has suffix {path.suffix or '(none)'}; a task file is one of: {suffixes}")
    elif cfg.name in BUILTIN_TASKS:
        raise PeftkitError(
            f"task {cfg.name!r} is not in the data folder {root} (from --data-dir / ${DATA_ENV}); "
            f"expected {root / cfg.name}/train.jsonl"
        )
    else:
        raise unknown_choice("task (or a .jsonl/.csv/.tsv path, or a task folder)", cfg.name, task_names(cfg.data_dir))
    if cfg.dev_size is not None:  # before subsampling: the same dev rows whatever the seed or train budget
        task.splits["train"], task.splits["dev"] = carve_dev(task.splits["train"], cfg.dev_size, cfg.dev_seed)
        after = f" after task.dev_size={cfg.dev_size:g} took its dev rows"
        validation.check_train_classes(task.name, task.splits["train"], task.label_names, after, "lower it")
    rng = random.Random(seed)
    if cfg.max_train_examples and len(task.splits["train"]) > cfg.max_train_examples:
        rows = len(task.splits["train"])
        after = f" in its seeded sample of task.max_train_examples={cfg.max_train_examples} of {rows} rows"
        task.splits["train"] = rng.sample(task.splits["train"], cfg.max_train_examples)
        validation.check_train_classes(task.name, task.splits["train"], task.label_names, after, "raise it")
    for split in ("validation", "test", "dev"):  # dev too: the cap sizes every evaluation, the selecting one included
        rows = task.splits.get(split)
        if cfg.max_eval_examples and rows and len(rows) > cfg.max_eval_examples:
            task.splits[split] = random.Random(cfg.dev_seed).sample(rows, cfg.max_eval_examples)
    return task


def _folder_task(cfg: TaskConfig, folder: Path, bad: list[str] | None) -> Task:
    meta = validation.read_meta(folder)
    pair_field = cfg.text_pair_field or ("text_pair" if "text_pair" in meta.get("fields", {}) else None)
    raw = {s: read_rows(folder / f"{s}.jsonl", cfg, bad) for s in SPLITS if (folder / f"{s}.jsonl").exists()}
    raw.update(split_files(cfg, bad))
    missing = [f"{s}.jsonl" for s in ("train", "validation") if s not in raw]
    if missing:
        found = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in TASK_FILE_SUFFIXES)
        tables = any(Path(name).suffix.lower() in validation.TABLE_SUFFIXES for name in found)
        hint = ""  # a folder of .jsonl files only lacks a split; one holding a CSV/TSV file is told how to name it
        if tables:
            hint = f"; it holds {', '.join(found)}: a CSV/TSV task is task.name=FILE task.validation_file=FILE"
        raise PeftkitError(f"task folder {folder} has no {' and no '.join(missing)} (a task folder needs both{hint})")
    pair_field = pair_field or data_pair_field(raw["train"])
    label_names = cfg.label_names if cfg.label_names is not None else meta.get("label_names")  # None: the data's
    builtin = BUILTIN_TASKS.get(folder.name)
    return _normalise(folder.name, raw, cfg, pair_field, label_names, builtin.metrics if builtin else None, bad)


def data_pair_field(train: list[dict[str, Any]]) -> str | None:
    """`text_pair` when the data's rows carry one and no task.text_pair_field was given: a pair task, read as pairs
    (a task file's second sentence was dropped without a word, the rows scored as single texts)."""
    return "text_pair" if train and "text_pair" in train[0] else None


def split_files(cfg: TaskConfig, bad: list[str] | None) -> dict[str, list[dict[str, Any]]]:
    """The splits task.validation_file and task.test_file give: they replace a task file's or folder's own (a
    folder task dropped them without a word, its test split left unscored)."""
    files = {"validation": cfg.validation_file, "test": cfg.test_file}
    return {split: read_rows(Path(file), cfg, bad) for split, file in files.items() if file}


def _file_task(cfg: TaskConfig, path: Path, bad: list[str] | None) -> Task:
    train = read_rows(path, cfg, bad)
    raw = {"train": train, **split_files(cfg, bad)}
    label_splits: tuple[str, ...] = ("train",)  # where the labels of a task without label names are read
    if "validation" not in raw:  # hold out 10% (by task.dev_seed: the same rows whatever train.seed) to pick a step
        rest, held = holdout(train, cfg.dev_seed)
        raw, label_splits = {**raw, "train": rest, "validation": held}, ("train", "validation")  # one file's labels
    pair_field = cfg.text_pair_field or data_pair_field(raw["train"])
    return _normalise(path.stem, raw, cfg, pair_field, cfg.label_names, None, bad, label_splits)


def _hub_task(cfg: TaskConfig, spec: BuiltinTask, bad: list[str] | None) -> Task:
    """Fallback for a user online with no data folder: the task's Hugging Face `datasets` id."""
    if cfg.validation_file or cfg.test_file:  # the Hub rows' fields are the Hub's: refused, never dropped unread
        raise PeftkitError(
            f"task.validation_file / task.test_file replace the splits of a task file or folder, not of the Hub's "
            f"{cfg.name!r}; point --data-dir at the data (or task.name at a folder) to use them"
        )
    try:
        import datasets
    except ImportError:
        raise PeftkitError(
            f"task {cfg.name!r}: no data folder set (--data-dir or ${DATA_ENV}) and the 'datasets' package is missing "
            f"for the Hub fallback ({spec.hf_path}); pip install 'peftkit[hub]' or point --data-dir at the data"
        ) from None
    try:
        ds = datasets.load_dataset(spec.hf_path, spec.hf_name)
    except Exception as e:
        raise PeftkitError(
            f"task {cfg.name!r}: no data folder set and the Hub copy {spec.hf_path} could not be loaded "
            f"({type(e).__name__}); set --data-dir or ${DATA_ENV}"
        ) from None
    label_names = ds["train"].features["label"].names
    raw = {s: [dict(r) for r in ds[s]] for s in SPLITS if s in ds}
    raw = {s: rows for s, rows in raw.items() if rows and rows[0]["label"] >= 0}  # GLUE hides test labels (-1)
    if "validation" not in raw:  # financial_phrasebank ships one split: hold out 10% + 10% as in meta.json
        rest, validation = holdout(raw["train"], cfg.dev_seed)  # by dev_seed: the same rows whatever train.seed
        rest, test = holdout(rest, cfg.dev_seed + 1, share=1 / 9)
        raw = {"train": rest, "validation": validation, "test": test}
    fields = TaskConfig(**{**cfg.__dict__, "text_field": spec.text, "text_pair_field": spec.text_pair})
    return _normalise(cfg.name, raw, fields, spec.text_pair, label_names, spec.metrics, bad)


def holdout(rows: list, seed: int, share: float = 0.1, count: int | None = None) -> tuple[list, list]:
    """A seeded split of `rows` into (the rest, a held-out `count` rows, or `share` of them, at least one)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = count if count is not None else max(1, int(len(rows) * share))
    return [rows[i] for i in order[cut:]], [rows[i] for i in order[:cut]]


def carve_dev(train: list, size: float, seed: int) -> tuple[list, list]:
    """(train without dev, dev): a seeded share (size < 1) or count (size >= 1) of train, leaving train non-empty."""
    count = int(size) if size >= 1 else max(1, int(len(train) * size))
    if count >= len(train):
        raise PeftkitError(
            f"task.dev_size={size:g} leaves no training rows (train has {len(train)}); give a share of train "
            "(e.g. task.dev_size=0.1) or a smaller count, or task.dev_size=null to select on validation"
        )
    return holdout(train, seed, count=count)


def read_rows(path: Path, cfg: TaskConfig | None = None, bad: list[str] | None = None) -> list[dict[str, Any]]:
    """Every row of a file, each a `validation.Row` that knows its file:line. With a `bad` list (task.on_bad_row:
    skip) invalid rows are appended to it instead of stopping the read."""
    cfg = cfg or TaskConfig()
    return validation.read_rows(path, cfg.encoding, cfg.delimiter, bad)


def _normalise(
    name: str,
    raw: dict[str, list[dict]],
    cfg: TaskConfig,
    pair_field: str | None,
    label_names: list[str] | None,
    metrics: tuple[str, ...] | None,
    bad: list[str] | None,
    label_splits: tuple[str, ...] = ("train",),
) -> Task:
    splits, label_names = validation.normalise_splits(name, raw, cfg, pair_field, label_names, bad, label_splits)
    default_metrics = ("accuracy", "f1") if len(label_names) == 2 else ("accuracy", "macro_f1")
    return Task(name, label_names, pair_field is not None, metrics or default_metrics, splits, list(bad or []))


# --------------------------------------------------------------------------------------------- tokens


@dataclass
class EncodedSplit:
    """One split tokenised once, unpadded; batches are padded to their own longest row by `collate`, with the
    tokenizer's pad id carried here so nothing downstream needs the tokenizer."""

    features: dict[str, list[list[int]]]
    labels: list[int] | None
    pad_token_id: int = 0

    def __len__(self) -> int:
        return len(self.features["input_ids"])

    def largest_token_id(self) -> int:
        """The largest id its batches carry (the pad's included), for the check that the model embeds them all."""
        return max([self.pad_token_id, *(max(ids, default=0) for ids in self.features["input_ids"])])

    def lengths(self) -> list[int]:
        """Tokens per row (what length-bucketed batching and length-sorted inference sort by)."""
        return [len(ids) for ids in self.features["input_ids"]]


def encode(rows: list[dict[str, Any]], tokenizer, max_length: int) -> EncodedSplit:
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keep = [k for k in ("input_ids", "token_type_ids") if k in enc]
    labels = [r["label"] for r in rows] if rows and all("label" in r for r in rows) else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedSplit({k: enc[k] for k in keep}, labels, pad)


def collate(split: EncodedSplit, indices: list[int]) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad the chosen rows to the longest of them (right padding, with the split's pad id)."""
    longest = max(len(split.features["input_ids"][i]) for i in indices)
    batch = {}
    for key, values in split.features.items():
        pad = split.pad_token_id if key == "input_ids" else 0
        batch[key] = torch.tensor([values[i] + [pad] * (longest - len(values[i])) for i in indices], dtype=torch.long)
    lengths = torch.tensor([len(split.features["input_ids"][i]) for i in indices])
    batch["attention_mask"] = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    if split.labels is not None:
        batch["labels"] = torch.tensor([split.labels[i] for i in indices], dtype=torch.long)
    return batch


# --------------------------------------------------------------------------------------------- metrics


def compute_metrics(predictions: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 always; binary F1 of label 1 for two-class tasks (MRPC's reported F1)."""
    from sklearn.metrics import accuracy_score, f1_score

    out = {
        "accuracy": float(accuracy_score(labels, predictions)),
        # over the classes present in labels or predictions: a class absent from both is no evidence either way
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }
    if num_labels == 2:
        out["f1"] = float(f1_score(labels, predictions, average="binary", pos_label=1, zero_division=0))
    return out


def majority_rate(train_labels: list[int], eval_labels: list[int]) -> float:
    """The accuracy on `eval_labels` of always answering the training split's most frequent label (ties: the lowest
    id): the floor every method must clear. The training majority, as a constant classifier would learn it; the
    evaluated split's own commonest label would be a choice made by looking at the answers."""
    majority = max(sorted(set(train_labels)), key=train_labels.count)
    return eval_labels.count(majority) / len(eval_labels)
