"""BitFit (Ben Zaken et al., 2022): train only the bias terms, plus the task head."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftkit.adapters.base import Method, MethodContext, freeze, unfreeze_head
from peftkit.errors import PeftkitError


@dataclass
class BitFitOptions:
    """BitFit has no options: every `*.bias` parameter trains."""


class BitFit(Method):
    name = "bitfit"
    options_class = BitFitOptions
    frozen_linears_in_bf16 = True
    merge_blocker = None  # the trained biases and head sit in the base model itself: merging is saving it whole

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        freeze(model)
        biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
        if not biases:
            raise PeftkitError("bitfit found no bias parameters in this model (Llama-style models have none)")
        for p in biases:
            p.requires_grad_(True)
        unfreeze_head(model, ctx.head_modules)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
