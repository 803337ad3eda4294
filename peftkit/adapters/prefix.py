"""Prefix tuning (Li & Liang, 2021) through peft: trainable key/value prefixes in every attention layer.

peft feeds prefixes as `past_key_values`. Where the classification forward takes none, peft calls the backbone
(`model.bert`) with them, pools, and applies the classifier itself, but only if the backbone's forward has a
`past_key_values` parameter. In transformers 5 BERT's backbone calls it `cache` (the old name is only a deprecated
alias, invisible to peft's signature check), though its self-attention does prepend cached keys/values for
encoders too (`cache.update` is not decoder-only). So for BERT-like classifiers whose head reads the pooled output
(`classifier` a Linear, backbone with a pooler: BERT, MiniLM), peftkit gives the backbone a forward that takes
`past_key_values` and hands it on as `cache`: peft's own path then trains, saves and reloads (tests/test_tuners.py).
Position ids of the real tokens start after the prefix, as in peft with transformers 4. Stock
`PeftModel.from_pretrained` needs the same one-line rename before loading (`prefix.accept_past_key_values(model)`).

Still refused with a clear error: classifiers whose head reads the sequence output (RoBERTa's classification head:
peft's fallback hands it the pooled vector) and decoders (GPT-2, Llama: peft's fallback takes `outputs[1]`, the
cache, as the pooled output).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.adapters._peft import PeftMethod
from peftkit.adapters.base import MethodContext
from peftkit.config_values import Positive
from peftkit.errors import PeftkitError


@dataclass
class PrefixOptions:
    num_virtual_tokens: Positive = 20
    prefix_projection: bool = False
    encoder_hidden_size: Positive = 512  # used with prefix_projection


def accept_past_key_values(model: nn.Module) -> nn.Module:
    """Make a BERT-like classifier usable by peft's prefix tuning (see the module docstring), or say why not."""
    if "past_key_values" in inspect.signature(model.forward).parameters:
        return model
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    params = inspect.signature(backbone.forward).parameters if backbone is not None else {}
    if "past_key_values" in params:
        return model
    if not (
        isinstance(getattr(model, "classifier", None), nn.Linear)
        and getattr(backbone, "pooler", None) is not None
        and "cache" in params
        and not model.config.is_decoder
    ):
        raise PeftkitError(
            f"prefix tuning needs key/value prefixes fed to attention; {type(model).__name__} (transformers installed "
            "here) takes no past_key_values and is not a BERT-like pooled classifier peftkit can adapt. "
            "Use method prompt or ptuning instead"
        )
    original = backbone.forward

    def forward(*args, past_key_values=None, **kwargs):
        return original(*args, cache=past_key_values, **kwargs)

    backbone.forward = forward
    return model


class PrefixTuning(PeftMethod):
    name = "prefix"
    options_class = PrefixOptions
    frozen_linears_in_bf16 = True
    merge_blocker = "prefix tuning adds key/value prefixes to attention; there are no weight updates to fold in"
    stock_peft_blocker = "on BERT-likes stock peft needs peftkit.adapters.prefix.accept_past_key_values(base) first"

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        return super().apply(accept_past_key_values(model), ctx)

    def load(self, base: nn.Module, directory: Path, ctx: MethodContext) -> nn.Module:
        return super().load(accept_past_key_values(base), directory, ctx)

    def peft_config(self, ctx: MethodContext) -> Any:
        from peft import PrefixTuningConfig, TaskType

        o = self.options
        return PrefixTuningConfig(
            task_type=TaskType.SEQ_CLS,
            num_virtual_tokens=o.num_virtual_tokens,
            prefix_projection=o.prefix_projection,
            encoder_hidden_size=o.encoder_hidden_size,
        )
