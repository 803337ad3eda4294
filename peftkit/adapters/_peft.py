"""Shared code for the methods peft implements: apply through `get_peft_model`, save in PEFT's own layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peftkit.adapters.base import Method, MethodContext


class PeftMethod(Method):
    """A method whose weights peft injects, saves (`adapter_config.json` + `adapter_model.safetensors`) and loads."""

    uses_peft = True
    merge_blocker = None

    def peft_config(self, ctx: MethodContext) -> Any:
        """Return the peft config (LoraConfig, IA3Config, ...) for this run."""
        raise NotImplementedError

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(ctx))

    def save(self, model: nn.Module, directory: Path) -> None:
        save_peft(model, directory)

    def load(self, base: nn.Module, directory: Path, ctx: MethodContext) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(directory), is_trainable=False)

    def merge(self, model: nn.Module) -> nn.Module:
        if self.merge_blocker:
            return super().merge(model)
        return merge_and_unload(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """peft's `merge_and_unload`, then the task head's `modules_to_save` wrappers replaced by the trained copy, as
    peft's own BaseTuner does. LN-tuning's unload (peft 0.21) skips them: `save_pretrained` then wrote
    `classifier.modules_to_save.default.*` keys, and stock transformers loaded a random classifier."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    model = model.merge_and_unload()
    while wrapped := next((n for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)), None):
        parent, _, child = wrapped.rpartition(".")
        wrapper = model.get_submodule(wrapped)
        unwrapped = wrapper.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        setattr(model.get_submodule(parent), child, unwrapped)
    return model


def save_peft(model: nn.Module, directory: Path) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors`. peftkit never resizes the vocabulary, so the
    base embeddings are never saved: peft's "auto" would ask the Hub whether the base's config.json exists,
    a network call at every save."""
    model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)


def peft_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Any]:
    """The tensors `save_peft` writes for one adapter, without the Hub lookup of peft's "auto" (see above)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)


def seq_cls_kwargs(ctx: MethodContext) -> dict[str, Any]:
    """Arguments every peft config gets: sequence classification, with the head trained and saved."""
    from peft import TaskType

    return {"task_type": TaskType.SEQ_CLS, "modules_to_save": list(ctx.head_modules)}


class OptionsAsPeftConfig(PeftMethod):
    """A peft tuner whose options dataclass uses peft's own field names: the config is `PeftConfigClass(**options)`.

    Subclasses set `peft_config_name` (the class name in `peft`, e.g. "VeraConfig") and an options dataclass.
    """

    peft_config_name: ClassVar[str] = ""

    def peft_config(self, ctx: MethodContext) -> Any:
        import peft

        return getattr(peft, self.peft_config_name)(**dataclasses.asdict(self.options), **seq_cls_kwargs(ctx))
