"""Any peft tuner by its peft type: `method.name=peft method.peft_type=VERA method.options={r: 64}`.

The options are checked against peft's own config class for that type (unknown keys list its valid fields), the
task type is sequence classification and the head is trained and saved (modules_to_save), as for every method.
Tuners that cannot work on an encoder classifier are refused with the reason (`UNSUPPORTED_PEFT_TYPES`, listed by
`peftkit methods`); the ones with their own peftkit entry that needs special handling point there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from peftkit.adapters._peft import PeftMethod, merge_and_unload, seq_cls_kwargs
from peftkit.adapters.base import MethodContext
from peftkit.errors import PeftkitError, unknown_choice

# peft types that cannot train a sequence classifier here, and why (found by applying each to a tiny BERT classifier)
UNSUPPORTED_PEFT_TYPES: dict[str, str] = {
    "ADAPTION_PROMPT": "gated prompts inside the self-attention of decoder-only models; peft implements it only for "
    "llama, mistral and gpt2 model types, not encoder classifiers",
    "CPT": "context-aware prompt tuning for causal language models; peft's CPTConfig accepts only task_type CAUSAL_LM",
    "CARTRIDGE": "a trained KV-cache prefix fed as past_key_values; sequence-classification forwards in "
    "transformers 5 take none",
    "MULTITASK_PROMPT_TUNING": "needs task_ids with every batch (one prompt per task); a peftkit run trains one task "
    "(use method prompt)",
    "POLY": "routes between LoRA skills by task_ids given with every batch; a peftkit run trains one task",
    "XLORA": "mixes already-trained LoRA adapters through a gating network in causal LMs (needs an adapters map and "
    "use_cache=False); it does not train a classifier",
}
# peft types whose peftkit entry does something the generic one cannot
USE_OWN_ENTRY: dict[str, str] = {
    "ADALORA": "adalora (its rank budget must be reallocated after every optimizer step)",
    "PREFIX_TUNING": "prefix (BERT-like encoders need peftkit's key/value injection)",
}
# peft types with bitsandbytes layers (a `bnb.py` in peft's tuner folder): they can train on a quantized base
QUANTIZABLE_PEFT_TYPES = ("HIRA", "IA3", "LORA", "PVERA", "RANDLORA", "ROAD")
MANAGED_FIELDS = ("task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping")


def peft_types() -> list[str]:
    """Every peft type the installed peft knows, e.g. ['ADALORA', ..., 'VERA']."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return sorted(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING)


def usable_peft_types() -> list[str]:
    return [t for t in peft_types() if t not in UNSUPPORTED_PEFT_TYPES and t not in USE_OWN_ENTRY]


def unsupported_peft_types() -> list[tuple[str, str]]:
    """(peft type, reason) for the tuners that cannot work on an encoder classifier: what `peftkit methods` prints."""
    return sorted(UNSUPPORTED_PEFT_TYPES.items())


def peft_options_class(peft_type: str) -> type:
    """peft's config class for `peft_type`, or a PeftkitError naming why it cannot be used here."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    key = str(peft_type).upper()
    if key in UNSUPPORTED_PEFT_TYPES:
        raise PeftkitError(f"peft type {key} cannot work on an encoder classifier: {UNSUPPORTED_PEFT_TYPES[key]}")
    if key in USE_OWN_ENTRY:
        raise PeftkitError(f"peft type {key} has its own peftkit method: use method.name={USE_OWN_ENTRY[key]}")
    by_name = {str(getattr(t, "value", t)): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if key not in by_name:
        raise unknown_choice("method.peft_type", str(peft_type), usable_peft_types())
    return by_name[key]


def option_fields(options_class: type) -> list[str]:
    return [f.name for f in dataclasses.fields(options_class) if f.name not in MANAGED_FIELDS]


@dataclass
class PeftOptions:
    peft_type: str = "LORA"  # a peft type, e.g. VERA, LOHA, C3A, RANDLORA (peftkit methods lists the unusable ones)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of peft's config class for that type

    def __post_init__(self):
        options_class = peft_options_class(self.peft_type)
        self.peft_type = self.peft_type.upper()
        if not isinstance(self.options, dict):
            raise PeftkitError(
                f"method.options must be a mapping of {options_class.__name__} fields, got {self.options!r}"
            )
        valid = option_fields(options_class)
        for key in self.options:
            if key not in valid:
                raise unknown_choice(f"option of {options_class.__name__} (method.options)", str(key), valid)


class GenericPeft(PeftMethod):
    """Any other peft tuner by type: method.peft_type=VERA method.options={...} (checked against peft's config)."""

    name = "peft"
    options_class = PeftOptions
    merge_blocker = None  # depends on the type: merge() reports peft's answer

    @property
    def targets_norms(self) -> bool:  # type: ignore[override]
        return self.options.peft_type == "LN_TUNING"

    def peft_config(self, ctx: MethodContext) -> Any:
        o = self.options
        options_class = peft_options_class(o.peft_type)
        kwargs = dict(o.options)
        shared = seq_cls_kwargs(ctx)
        if "modules_to_save" in option_fields(options_class):
            kwargs["modules_to_save"] = sorted({*(kwargs.get("modules_to_save") or []), *shared["modules_to_save"]})
        try:
            return options_class(task_type=shared["task_type"], **kwargs)
        except (TypeError, ValueError) as e:
            raise PeftkitError(f"peft rejected the options of {o.peft_type}: {str(e).splitlines()[0]}") from None

    def quantization_error(self) -> str | None:
        if self.options.peft_type in QUANTIZABLE_PEFT_TYPES:
            return None
        return (
            f"peft type {self.options.peft_type} cannot train on a quantized base (model.quantization): peft has "
            f"bitsandbytes layers only for {', '.join(QUANTIZABLE_PEFT_TYPES)} (and adalora, dora)"
        )

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        try:
            return super().apply(model, ctx)
        except PeftkitError:
            raise
        except (TypeError, ValueError, AttributeError) as e:  # e.g. a rank larger than this model's layers
            raise PeftkitError(
                f"peft cannot apply {self.options.peft_type} to {type(model).__name__}: {str(e).splitlines()[0][:300]}"
            ) from None

    def merge(self, model: nn.Module) -> nn.Module:
        try:
            return merge_and_unload(model)
        except (AttributeError, NotImplementedError, ValueError) as e:
            raise PeftkitError(
                f"peft type {self.options.peft_type} cannot be merged: {str(e).splitlines()[0]}"
            ) from None
