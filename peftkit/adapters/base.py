"""The contract every adaptation method follows, and the helpers they share.

A method is a class with a config dataclass (`options_class`) and four jobs:
`apply` (inject trainable parts, freeze the rest), `save` / `load` (weights only, safetensors),
and optionally `merge` (fold into the base) and `after_optimizer_step` (the one hook the loop calls).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peftkit.errors import PeftkitError
from peftkit.io import load_tensors, save_tensors

WEIGHTS_FILE = "peftkit_weights.safetensors"  # weights of methods peft does not have


@dataclass
class MethodContext:
    """What a method may need to know about the run when it is applied."""

    model_path: str  # resolved base model directory or Hub id (prompt tuning's text init reads its tokenizer)
    head_modules: list[
        str
    ]  # the task head's module names: ["classifier", "bert.pooler.dense"] (BERT), ["score"] (GPT-2)
    total_steps: int = 1  # optimizer steps in the run (AdaLoRA's rank schedule needs it)
    # n -> up to n training batches (dicts of tensors, labels included); LoRA's eva init reads them. None: no data
    calibration: Callable[[int], list[dict[str, Any]]] | None = None


class Method:
    """Base class: subclasses set `name`, `options_class` and implement `apply`."""

    name: ClassVar[str] = ""
    options_class: ClassVar[type] = object
    uses_peft: ClassVar[bool] = False  # saved in PEFT's own adapter layout
    merge_blocker: ClassVar[str | None] = "this method adds modules that cannot be folded into the base weights"
    restore_best: ClassVar[bool] = True  # whether the loop may roll back to the best evaluation at the end
    resume_blocker: ClassVar[str | None] = None  # why checkpoints of this method would not resume exactly, if so
    # why stock `PeftModel.from_pretrained` cannot load its PEFT-format folder as is, if so: the model card says it
    stock_peft_blocker: ClassVar[str | None] = None
    stock_peft_note: ClassVar[str | None] = None  # a harmless message that load prints: the model card explains it
    quantizable: ClassVar[bool] = False  # peft has bitsandbytes (8-bit/4-bit) layers for it: model.quantization works
    frozen_body: ClassVar[bool] = False  # trains no body weight (the head probe): `model.pooling: auto` then differs
    # its frozen nn.Linear weights enter only their layer's product, so a bf16 run may store them in bf16
    # (`precision.hold_frozen_linears_in_bf16`); False where the method reads base weights itself (DoRA's norms)
    frozen_linears_in_bf16: ClassVar[bool] = False

    @property
    def resumable(self) -> bool:
        return self.resume_blocker is None

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.options_class()

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError

    def quantization_error(self) -> str | None:
        """Why this method cannot train on a quantized (model.quantization) base, or None when it can."""
        if self.quantizable:
            return None
        return (
            f"method {self.name!r} cannot train on a quantized base (model.quantization): peft has bitsandbytes "
            "layers only for the LoRA family (lora, dora, adalora, ia3; through method peft also HIRA, PVERA, "
            "RANDLORA, ROAD); unset model.quantization or use one of those"
        )

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called by the loop after every optimizer step, before gradients are cleared. Default: nothing."""

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the trainable weights (and only those) as safetensors."""
        save_tensors(directory / WEIGHTS_FILE, trainable_state(model))

    def load(self, base: nn.Module, directory: Path, ctx: MethodContext) -> nn.Module:
        model = self.apply(base, ctx)
        weights = load_tensors(directory / WEIGHTS_FILE)
        result = model.load_state_dict(weights, strict=False)
        if result.unexpected_keys:
            raise PeftkitError(
                f"{directory / WEIGHTS_FILE} holds weights this model has no place for "
                f"(e.g. {result.unexpected_keys[0]}); was it trained on another base model?"
            )
        missing = set(trainable_state(model)) - set(weights)
        if missing:
            raise PeftkitError(f"{directory / WEIGHTS_FILE} lacks trained weights, e.g. {sorted(missing)[0]}")
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Return a plain transformers model with the adaptation folded in."""
        raise PeftkitError(f"method {self.name!r} cannot be merged: {self.merge_blocker}")


# --------------------------------------------------------------------------------------------- helpers


def trainable_state(model: nn.Module) -> dict[str, Any]:
    """The parameters that require grad, by name: what a method trains, saves and checkpoints."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_head(model: nn.Module, head_modules: list[str]) -> None:
    """Train the task head (classifier and pooler, if pooled by it): every method does, prompt methods included."""
    for name in head_modules:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def is_head_parameter(name: str, head_modules: list[str]) -> bool:
    """True for parameters of the task head, also under peft's `base_model.model.` and `modules_to_save` prefixes."""
    dotted = f".{name}."
    return any(f".{h}." in dotted for h in head_modules)
