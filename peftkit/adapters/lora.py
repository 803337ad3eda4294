"""LoRA (Hu et al., 2021) through peft: a trainable low-rank update B·A beside frozen weight matrices."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.adapters._peft import PeftMethod, seq_cls_kwargs
from peftkit.adapters.base import MethodContext


@dataclass
class LoraOptions:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: list[str] | None = None  # None: peft's default for the architecture (BERT: query, value)
    bias: str = "none"


class LoRA(PeftMethod):
    name = "lora"
    quantizable = True
    config_class = LoraOptions
    use_dora = False

    def peft_config(self, ctx: MethodContext) -> Any:
        from peft import LoraConfig

        o = self.options
        return LoraConfig(
            r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules, bias=o.bias,
            use_dora=self.use_dora, **seq_cls_kwargs(ctx),
        )
