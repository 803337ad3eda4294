"""Prefix tuning (Li & Liang, 2021) through peft: trainable key/value prefixes in every attention layer.

peft feeds prefixes as `past_key_values`, so it runs only where the classification model's forward accepts them.
In transformers 5, BERT, GPT-2 and Llama sequence-classification forwards do not; peft would fail deep inside the
first forward pass, so `apply` checks first and says so.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from peftkit.adapters._peft import PeftMethod
from peftkit.adapters.base import MethodContext
from peftkit.config import Positive
from peftkit.errors import PeftkitError


@dataclass
class PrefixOptions:
    num_virtual_tokens: Positive = 20
    prefix_projection: bool = False
    encoder_hidden_size: Positive = 512  # used with prefix_projection


class PrefixTuning(PeftMethod):
    name = "prefix"
    options_class = PrefixOptions
    merge_blocker = "prefix tuning adds key/value prefixes to attention; there are no weight updates to fold in"

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        if "past_key_values" not in inspect.signature(model.forward).parameters:
            raise PeftkitError(
                f"prefix tuning needs a model whose classification forward takes past_key_values; "
                f"{type(model).__name__} (transformers installed here) does not. Use method prompt or ptuning instead"
            )
        return super().apply(model, ctx)

    def peft_config(self, ctx: MethodContext) -> Any:
        from peft import PrefixTuningConfig, TaskType

        o = self.options
        return PrefixTuningConfig(
            task_type=TaskType.SEQ_CLS, num_virtual_tokens=o.num_virtual_tokens,
            prefix_projection=o.prefix_projection, encoder_hidden_size=o.encoder_hidden_size,
        )
