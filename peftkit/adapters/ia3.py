"""(IA)^3 (Liu et al., 2022) through peft: learned vectors that rescale keys, values and feed-forward activations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.adapters._peft import PeftMethod, seq_cls_kwargs
from peftkit.adapters.base import MethodContext


@dataclass
class IA3Options:
    target_modules: list[str] | None = None  # None: peft's default (BERT: key, value, output.dense)
    feedforward_modules: list[str] | None = None  # None: peft's default (BERT: output.dense)


class IA3(PeftMethod):
    name = "ia3"
    quantizable = True
    options_class = IA3Options
    frozen_linears_in_bf16 = True

    def peft_config(self, ctx: MethodContext) -> Any:
        from peft import IA3Config

        o = self.options
        return IA3Config(
            target_modules=o.target_modules, feedforward_modules=o.feedforward_modules, **seq_cls_kwargs(ctx)
        )
