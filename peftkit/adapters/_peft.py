"""Shared code for the methods peft implements: apply through `get_peft_model`, save in PEFT's own layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peftkit.adapters.base import Method, MethodContext
from peftkit.errors import PeftkitError
from peftkit.pooling import select_last_by_mask


class PeftMethod(Method):
    """A method whose weights peft injects, saves (`adapter_config.json` + `adapter_model.safetensors`) and loads."""

    uses_peft = True
    merge_blocker = None
    targets_norms: ClassVar[bool] = False  # its target_modules name norm layers (LN-tuning), not linear ones

    def peft_config(self, ctx: MethodContext) -> Any:
        """Return the peft config (LoraConfig, IA3Config, ...) for this run."""
        raise NotImplementedError

    def checked_config(self, model: nn.Module, ctx: MethodContext) -> Any:
        """`peft_config(ctx)` with its target_modules resolved against `model` (`resolve_target_modules`)."""
        config = self.peft_config(ctx)
        resolve_target_modules(config, model, self.name, ctx.head_modules, self.targets_norms)
        return config

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        from peft import get_peft_model

        return pool_virtual_tokens(get_peft_model(model, self.checked_config(model, ctx)))

    def save(self, model: nn.Module, directory: Path) -> None:
        save_peft(model, directory)

    def load(self, base: nn.Module, directory: Path, ctx: MethodContext) -> nn.Module:
        from peft import PeftModel

        return pool_virtual_tokens(PeftModel.from_pretrained(base, str(directory), is_trainable=False))

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


def resolve_target_modules(
    config: Any, model: nn.Module, method: str, head_modules: list[str], norms: bool = False
) -> None:
    """Make `config.target_modules` what the user meant, for every peft-backed method alike.

    `method.target_modules=all-linear` arrives as ['all-linear']: peft knows only the plain string. A listed name
    that matches no module (peft's rule: the module's dotted name, or its last parts) is a one-line error naming
    it and the names this model does have, e.g. the recipes' BERT `query, value` on GPT-2 (`c_attn`): peft would
    otherwise adapt the names that do match and drop the rest silently, or fail in a message that names neither."""
    targets = getattr(config, "target_modules", None)
    if targets is None or isinstance(targets, str):
        return
    if set(targets) == {"all-linear"}:
        config.target_modules = "all-linear"
        return
    names = [name for name, _ in model.named_modules() if name]
    unmatched = sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names))
    if not unmatched:
        return
    kind = "norm" if norms else "linear"
    examples = adaptable_modules(model, head_modules, norms)
    leaves = list(dict.fromkeys(name.rpartition(".")[2] for name in examples))
    listing = f"{', '.join(leaves[:8])} (e.g. {examples[0]})" if examples else "none"
    fix = "method.target_modules to" if norms else "method.target_modules=all-linear, or to"
    raise PeftkitError(
        f"method {method!r} could not be applied to {type(model).__name__}: target_modules {unmatched} match no "
        f"module of it; its {kind} modules are named {listing}. Set {fix} some of those names"
    )


def adaptable_modules(model: nn.Module, head_modules: list[str], norms: bool = False) -> list[str]:
    """Dotted names of the model's linear layers (nn.Linear, GPT-2's Conv1D), or norm layers, outside the head."""
    from transformers.pytorch_utils import Conv1D

    def wanted(module: nn.Module) -> bool:
        return type(module).__name__.endswith("Norm") if norms else isinstance(module, (nn.Linear, Conv1D))

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(f"{h}.") for h in head_modules)

    return [name for name, module in model.named_modules() if wanted(module) and not in_head(name)]


def pool_virtual_tokens(model: nn.Module) -> nn.Module:
    """Under peft's prompt learning (prompt, p-tuning, prefix: virtual tokens in front of the input), pool the last
    token by the attention mask, not by the decoder head's own search of input_ids (`pooling.select_last_by_mask`)."""
    if model.active_peft_config.is_prompt_learning:
        select_last_by_mask(model.get_base_model())
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
