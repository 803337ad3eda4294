"""P-tuning (Liu et al., 2021) through peft: virtual tokens produced by a small trainable prompt encoder (MLP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from peftkit.adapters._peft import PeftMethod
from peftkit.adapters.base import MethodContext
from peftkit.config_values import Positive


@dataclass
class PTuningOptions:
    num_virtual_tokens: Positive = 20
    encoder_hidden_size: Positive = 128
    encoder_type: Literal["MLP", "LSTM"] = "MLP"


class PTuning(PeftMethod):
    name = "ptuning"
    options_class = PTuningOptions
    frozen_linears_in_bf16 = True
    merge_blocker = "p-tuning adds virtual tokens to the input; there are no weight updates to fold in"

    def peft_config(self, ctx: MethodContext) -> Any:
        from peft import PromptEncoderConfig, TaskType

        o = self.options
        return PromptEncoderConfig(
            task_type=TaskType.SEQ_CLS,
            num_virtual_tokens=o.num_virtual_tokens,
            encoder_hidden_size=o.encoder_hidden_size,
            encoder_reparameterization_type=o.encoder_type,
        )
