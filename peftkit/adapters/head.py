"""The linear probe: only the task head trains on the frozen body (the pooler too, when the model pools with it).

The cheapest row of every benchmark table and the floor every other method must beat. Frozen features are not
cached across epochs: the loop feeds the model batches, not example ids, so a cache would have to key on token ids
inside a forward wrapper, and with dropout active in training a cached feature is not what the body computes.
Without a backward pass through the body a step already costs about one forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftkit.adapters.base import Method, MethodContext, freeze, unfreeze_head


@dataclass
class HeadOptions:
    """The probe has no options: the head (and the pooler, under `model.pooling: pooler`) trains."""


class HeadOnly(Method):
    name = "head"
    options_class = HeadOptions
    frozen_linears_in_bf16 = True
    merge_blocker = None  # the trained head sits in the base model itself: merging is saving it whole
    frozen_body = True  # auto pooling: a sentence-transformers model's own pooling, not a pooler on frozen [CLS]

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        freeze(model)
        unfreeze_head(model, ctx.head_modules)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
