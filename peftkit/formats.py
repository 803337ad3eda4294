"""The two files a run writes for others to read, typed: an adapter folder's `peftkit.json` and a run's `summary.json`.

Each format is one dataclass with one writer (`write`) and one reader (`read`). Both carry `format_version`
"MAJOR.MINOR": a reader accepts every minor version of the major it knows (keys added by a newer minor are
ignored) and refuses a newer major with a message saying to upgrade. Version 1 files (the integer 1) read as 1.0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.io import atomic_write_json, read_json

ADAPTER_META_FILE = "peftkit.json"
SUMMARY_FILE = "summary.json"
ADAPTER_FORMAT = "1.2"  # 1.2: pooling, head_modules, weights_sha256; base_quantization (optional: old readers skip it)
SUMMARY_FORMAT = "1.2"


def check_version(found: Any, supported: str, where: Path) -> None:
    """Refuse a file from a newer major version (or with no readable version at all)."""
    text = str(found) if isinstance(found, (int, str)) and not isinstance(found, bool) else ""
    major = text.split(".")[0]
    if not major.isdigit():
        raise PeftkitError(f"{where} has no valid format_version (found {found!r}); is it a peftkit file?")
    if int(major) > int(supported.split(".")[0]):
        raise PeftkitError(
            f"{where} has format_version {text}, newer than this peftkit reads ({supported}); "
            "upgrade peftkit (pip install -U peftkit)"
        )


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


_KIND_NAMES = {str: "string", dict: "mapping", list: "list"}


def _require(data: dict[str, Any], keys: tuple[str, ...], where: Path) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise PeftkitError(f"{where} lacks {', '.join(missing)}; is the file damaged?")


@dataclass
class TaskInfo:
    """What an adapter records about its task: enough to predict without the data."""

    name: str
    label_names: list[str]
    is_pair: bool = False
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    text_field: str = "text"
    text_pair_field: str | None = None
    max_length: int = 512  # the training truncation length; inference uses the same

    @classmethod
    def from_dict(cls, data: Any, where: Path) -> TaskInfo:
        if not isinstance(data, dict):
            raise PeftkitError(f"{where}: 'task' must be a mapping, got {type(data).__name__}")
        _require(data, ("name", "label_names"), where)
        names = data["label_names"]
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, (str, int)) for n in names):
            raise PeftkitError(f"{where}: task.label_names must be a list of at least 2 label names, got {names!r}")
        if len({str(n) for n in names}) != len(names):
            raise PeftkitError(f"{where}: task.label_names has duplicates: {names!r}")
        info = cls(**{**_known_fields(cls, data), "label_names": [str(n) for n in names]})
        if not isinstance(info.max_length, int) or isinstance(info.max_length, bool) or info.max_length < 1:
            raise PeftkitError(f"{where}: task.max_length must be a positive integer, got {info.max_length!r}")
        if not isinstance(info.text_field, str) or not isinstance(info.is_pair, bool):
            raise PeftkitError(f"{where}: task.text_field must be a string and task.is_pair true or false")
        return info

    @property
    def input_fields(self) -> tuple[str, str | None]:
        """The row fields a user's input file holds, as named at training time."""
        return self.text_field or "text", (self.text_pair_field or "text_pair") if self.is_pair else None


@dataclass
class AdapterMeta:
    """`peftkit.json`: which method, with which options, on which base, for which task, and how good it was."""

    method: str
    method_options: dict[str, Any]
    peft_format: bool  # weights in PEFT's layout (adapter_config.json + adapter_model.safetensors)
    base_model: str  # portable name (a Hub id for the default model, never a path into a virtualenv)
    task: TaskInfo
    base_fingerprint: str | None = None
    metrics: dict[str, Any] | None = None  # {"validation": {...}, "test": {...} or None}
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_pct: float | None = None
    adapter_bytes: int | None = None
    combined_from: list[dict[str, Any]] | None = None  # set by `peftkit combine`: the source adapters and weights
    combination: dict[str, Any] | None = None  # how they were combined
    pooling: str = "pooler"  # model.pooling the head was trained with (files before 1.2: the stock pooler, frozen)
    head_modules: list[str] | None = None  # modules trained and saved as the head; None (before 1.2): the classifier
    weights_sha256: dict[str, str] | None = None  # {weights file name: sha256 hex}, verified on every load (1.2)
    # model.quantization of the base it trained on (8bit/4bit): its metrics are that model's, while every load puts
    # the adapter on the full-precision base
    base_quantization: str | None = None
    format_version: str = ADAPTER_FORMAT

    @property
    def label_names(self) -> list[str]:
        return self.task.label_names

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "format_version": ADAPTER_FORMAT}

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / ADAPTER_META_FILE
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, directory: str | Path) -> AdapterMeta:
        directory = Path(directory)
        if not directory.is_dir():
            raise PeftkitError(f"adapter folder {directory} does not exist")
        path = directory / ADAPTER_META_FILE
        if not path.is_file():
            raise PeftkitError(
                f"{directory} is not a peftkit adapter folder (no {ADAPTER_META_FILE}); "
                "for a run folder pass RUN_DIR/adapter"
            )
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, data: Any, where: Path) -> AdapterMeta:
        if not isinstance(data, dict):
            raise PeftkitError(f"{where} must hold a JSON object, got {type(data).__name__}")
        check_version(data.get("format_version"), ADAPTER_FORMAT, where)
        _require(data, ("method", "base_model", "task"), where)
        if not isinstance(data["method"], str) or not isinstance(data["base_model"], str):
            raise PeftkitError(f"{where}: method and base_model must be strings")
        options = data.get("method_options") or {}
        if not isinstance(options, dict):
            raise PeftkitError(f"{where}: method_options must be a mapping, got {type(options).__name__}")
        for key, kind in (
            ("base_fingerprint", str),
            ("metrics", dict),
            ("combination", dict),
            ("combined_from", list),
            ("weights_sha256", dict),
        ):
            if data.get(key) is not None and not isinstance(data[key], kind):
                raise PeftkitError(
                    f"{where}: {key} must be a {_KIND_NAMES[kind]} or null, got {type(data[key]).__name__}"
                )
        hashes = data.get("weights_sha256") or {}
        for name, digest in hashes.items():
            if (
                not isinstance(digest, str)
                or len(digest) != 64
                or not set(digest) <= set("0123456789abcdef")
                or "/" in name
                or "\\" in name
                or name.startswith(".")
            ):
                raise PeftkitError(
                    f"{where}: weights_sha256 must map file names in the folder to sha256 hex digests, "
                    f"got {name!r}: {digest!r}"
                )
        known = _known_fields(cls, data)
        known.update(
            method_options=options,
            peft_format=bool(data.get("peft_format")),
            task=TaskInfo.from_dict(data["task"], where),
            format_version=ADAPTER_FORMAT,
        )
        if known.get("pooling", "pooler") not in ("pooler", "cls", "mean", "last"):
            raise PeftkitError(f"{where}: pooling must be pooler, cls, mean or last, got {known['pooling']!r}")
        if known.get("base_quantization") not in (None, "8bit", "4bit"):
            shown = known["base_quantization"]
            raise PeftkitError(f"{where}: base_quantization must be 8bit, 4bit or null, got {shown!r}")
        heads = known.get("head_modules")
        if heads is not None and not (isinstance(heads, list) and all(isinstance(h, str) for h in heads)):
            raise PeftkitError(f"{where}: head_modules must be a list of module names, got {heads!r}")
        if "merged_from" in data and "combined_from" not in data:  # format 1.0 name
            known.update(combined_from=data["merged_from"], combination=data.get("merge"))
        return cls(**known)


@dataclass
class RunSummary:
    """`summary.json`: what a finished run measured. The benchmark harness reads runs through this."""

    recipe: str | None
    task: str
    method: str
    model: str
    seed: int
    steps: int
    examples_seen: int
    train_examples: int
    validation_examples: int
    final: dict[str, float]  # the last evaluation
    best: dict[str, float]  # the evaluation the run kept ("step" included), on `selection_split`
    test: dict[str, float] | None
    kept: str  # "best" or "final"
    trainable_params: int
    total_params: int
    trainable_pct: float
    train_seconds: float
    train_examples_per_s: float
    peak_memory_mb: float
    baseline_memory_mb: float
    peak_memory_above_baseline_mb: float
    memory_kind: str  # "process_peak_rss" (CPU) or "cuda_max_allocated"
    model_state_mb: float
    device: str
    bf16: bool
    world_size: int
    environment: dict[str, Any]
    run_dir: str
    adapter_bytes: int | None = None
    selection_split: str = "validation"  # where the best step was chosen: validation, or a dev split from train
    validation: dict[str, float] | None = None  # the kept weights on validation when selection_split is dev
    stopped_early: bool = False  # train.patience ended the run before its last step
    majority_rate: float | None = None  # validation accuracy of always answering the training majority label
    extra: dict[str, Any] = field(default_factory=dict)  # anything a newer loop adds before it earns a field
    format_version: str = SUMMARY_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "format_version": SUMMARY_FORMAT}

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / SUMMARY_FILE
        atomic_write_json(path, nan_as_null(self.to_dict()))
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> RunSummary:
        path = Path(run_dir) / SUMMARY_FILE
        if not path.is_file():
            raise PeftkitError(f"{run_dir} has no {SUMMARY_FILE}; did the run finish?")
        data = read_json(path)
        if not isinstance(data, dict):
            raise PeftkitError(f"{path} must hold a JSON object")
        check_version(data.get("format_version", 1), SUMMARY_FORMAT, path)
        required = tuple(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        _require(data, required, path)
        return cls(**{**_known_fields(cls, data), "format_version": SUMMARY_FORMAT})


def nan_as_null(value: Any) -> Any:
    """JSON has no NaN: write non-finite floats as null rather than producing an invalid file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nan_as_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_as_null(v) for v in value]
    return value
