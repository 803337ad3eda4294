"""Full fine-tuning: every parameter trains. The baseline every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftkit.adapters.base import Method, MethodContext


@dataclass
class FullOptions:
    """Full fine-tuning has no options of its own; the learning rate lives in `train`."""


class FullFineTuning(Method):
    name = "full"
    options_class = FullOptions
    merge_blocker = None  # the run trained the whole model: merging is saving it as a plain transformers folder

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
