"""Shared code for the methods peft implements: apply through `get_peft_model`, save in PEFT's own layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peftkit.adapters.base import Method, MethodContext, is_head_parameter
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
        """`peft_config(ctx)` resolved against `model`: its target_modules (`resolve_target_modules`), or the
        widths and counts of its virtual tokens (`size_virtual_tokens`)."""
        config = self.peft_config(ctx)
        resolve_target_modules(config, model, self.name, ctx.head_modules, self.targets_norms)
        size_virtual_tokens(config, model)
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
    """The task head's `modules_to_save` wrappers replaced by their trained copy, as peft's own BaseTuner does, and
    then peft's `merge_and_unload`. First, because most tuners' unload (IA3, BOFT, OFT, VeRA, ...) reads `.weight`
    off each module it replaces, which a wrapper of a composite head (ModernBERT's dense + norm) passes to a module
    that has none; and because LN-tuning's unload (peft 0.21) skips them: `save_pretrained` then wrote
    `classifier.modules_to_save.default.*` keys, and stock transformers loaded a random classifier."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    while wrapped := next((n for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)), None):
        parent, _, child = wrapped.rpartition(".")
        wrapper = model.get_submodule(wrapped)
        unwrapped = wrapper.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        setattr(model.get_submodule(parent), child, unwrapped)
    return model.merge_and_unload()


def resolve_target_modules(
    config: Any, model: nn.Module, method: str, head_modules: list[str], norms: bool = False
) -> None:
    """Make `config.target_modules` what the user meant, for every peft-backed method alike.

    `method.target_modules=all-linear` arrives as ['all-linear']: peft knows only the plain string. A listed name
    that matches no module (peft's rule: the module's dotted name, or its last parts) is a one-line error naming
    it and the names this model does have, e.g. the recipes' BERT `query, value` on GPT-2 (`c_attn`): peft would
    otherwise adapt the names that do match and drop the rest silently, or fail in a message that names neither.
    No target_modules where peft has no default for the architecture (ALBERT, MPNet, ...) is the same kind of line,
    not peft's bare "Please specify `target_modules`"."""
    if not hasattr(config, "target_modules"):  # prompt learning: virtual tokens, no target layers
        return
    targets = config.target_modules
    if targets is None:
        if not getattr(config, "target_parameters", None) and not peft_has_default_targets(config, model):
            raise PeftkitError(
                f"method {method!r} could not be applied to {type(model).__name__}: peft has no default "
                f"target_modules for model type {model.config.model_type!r}; "
                + name_the_modules(model, method, head_modules, norms)
            )
        return
    if not isinstance(targets, str) and set(targets) == {"all-linear"}:
        config.target_modules = targets = "all-linear"
    if norms and targets == "all-linear":  # peft would take it and train every linear layer whole: not LN-tuning
        raise PeftkitError(
            f"method {method!r} tunes norm layers, and target_modules=all-linear names linear ones; "
            + name_the_modules(model, method, head_modules, norms)
        )
    if targets == "all-linear":
        choose_feedforward_modules(config, model, adaptable_modules(model, head_modules))
    if isinstance(targets, str):  # all-linear, or a regular expression (method peft)
        return
    names = [name for name, _ in model.named_modules() if name]
    unmatched = sorted(t for t in targets if not any(names_module(t, n) for n in names))
    if unmatched:
        raise PeftkitError(
            f"method {method!r} could not be applied to {type(model).__name__}: target_modules {unmatched} match no "
            f"module of it; " + name_the_modules(model, method, head_modules, norms)
        )
    targeted = [n for n in adaptable_modules(model, head_modules) if any(names_module(t, n) for t in targets)]
    choose_feedforward_modules(config, model, targeted)


def names_module(target: str, name: str) -> bool:
    """peft's rule for a target_modules entry: the module's dotted name, or its last parts."""
    return name == target or name.endswith(f".{target}")


def name_the_modules(model: nn.Module, method: str, head_modules: list[str], norms: bool) -> str:
    """The end of a target_modules error: the model's own linear (or norm) module names and how to set them (the
    generic `peft` method takes peft's fields inside method.options)."""
    kind = "norm" if norms else "linear"
    examples = adaptable_modules(model, head_modules, norms)
    leaves = list(dict.fromkeys(name.rpartition(".")[2] for name in examples))
    listing = f"{', '.join(leaves[:8])} (e.g. {examples[0]})" if examples else "none"
    peft = method == "peft"
    to = "method.options' target_modules" if peft else "method.target_modules"
    every = "method.options={target_modules: all-linear}" if peft else "method.target_modules=all-linear"
    fix = f"Set {to} to some of those names" if norms else f"Set {every}, or {to} to some of those names"
    return f"its {kind} modules are named {listing}. {fix}"


def peft_type_name(config: Any) -> str:
    """A peft config's type as its plain name (peft_type is an enum, or a string in a config read back)."""
    return str(getattr(config.peft_type, "value", config.peft_type))


# peft tuners that choose their own targets where their table has none (OSF: all-linear; SHADOW: every block)
OWN_DEFAULT_TARGETS = ("OSF", "SHADOW")


def peft_has_default_targets(config: Any, model: nn.Module) -> bool:
    """Whether peft fills target_modules=None for this model type: its tuner's table (e.g. LoRA's has ELECTRA,
    AdaLoRA's does not). A tuner without a table, or with a fallback of its own, is left to peft (True)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import constants

    peft_type = peft_type_name(config)
    if peft_type in OWN_DEFAULT_TARGETS:
        return True
    table = getattr(PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type), "target_module_mapping", None)
    table = table or getattr(constants, f"TRANSFORMERS_MODELS_TO_{peft_type}_TARGET_MODULES_MAPPING", None)
    return table is None or getattr(model.config, "model_type", None) in table


def choose_feedforward_modules(config: Any, model: nn.Module, targeted: list[str]) -> None:
    """IA3 scales a feed-forward layer's input, every other layer's output. Where peft has no feed-forward table
    for the architecture and none is given, the feed-forward layers are the targeted linear layers that narrow
    (in_features > out_features: the FFN's down projection, as in the IA3 paper and peft's own tables).
    Under all-linear, peft saves target_modules as full names but its table's feed-forward entries as suffixes
    ('output.dense'), which its own load then refuses (not a subset): the table's entries become full names too."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD

    if not hasattr(config, "feedforward_modules") or config.feedforward_modules is not None:
        return
    table = FEEDFORWARD.get(getattr(model.config, "model_type", None))
    if table is None:
        config.feedforward_modules = [name for name in targeted if narrows(model.get_submodule(name))]
    elif config.target_modules == "all-linear":
        config.feedforward_modules = [name for name in targeted if any(names_module(t, name) for t in table)]


def narrows(layer: nn.Module) -> bool:
    """A linear layer (nn.Linear, or GPT-2's Conv1D: nx inputs, nf outputs) with more inputs than outputs."""
    if isinstance(layer, nn.Linear):
        return layer.in_features > layer.out_features
    return layer.nx > layer.nf


def size_virtual_tokens(config: Any, model: nn.Module) -> None:
    """peft makes prompt / p-tuning virtual tokens `hidden_size` wide, but they are concatenated with the input
    embeddings, narrower on ALBERT and ELECTRA (`embedding_size`); and it reads layer and head counts by their
    usual config.json keys only (DistilBERT's are n_layers, n_heads, dim). Both are taken from the model itself."""
    if not getattr(config, "is_prompt_learning", False):
        return
    if peft_type_name(config) in ("PROMPT_TUNING", "P_TUNING"):
        if config.token_dim is None:
            config.token_dim = model.get_input_embeddings().embedding_dim
    for field, key in (("num_layers", "num_hidden_layers"), ("num_attention_heads", "num_attention_heads")):
        if getattr(config, field) is None and isinstance(getattr(model.config, key, None), int):
            setattr(config, field, getattr(model.config, key))


def adaptable_modules(model: nn.Module, head_modules: list[str], norms: bool = False) -> list[str]:
    """Dotted names of the model's linear layers (nn.Linear, GPT-2's Conv1D), or norm layers, outside the head."""
    from transformers.pytorch_utils import Conv1D

    def wanted(module: nn.Module) -> bool:
        return type(module).__name__.endswith("Norm") if norms else isinstance(module, (nn.Linear, Conv1D))

    return [n for n, module in model.named_modules() if wanted(module) and not is_head_parameter(n, head_modules)]


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
