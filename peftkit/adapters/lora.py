"""LoRA (Hu et al., 2021) through peft: a trainable low-rank update B·A beside frozen weight matrices."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from peftkit.adapters._peft import PeftMethod, seq_cls_kwargs
from peftkit.adapters.base import MethodContext
from peftkit.config import Positive, Probability, Range


@dataclass
class LoraOptions:
    r: Positive = 8
    alpha: Annotated[float, Range(gt=0)] = 16
    dropout: Probability = 0.1
    target_modules: list[str] | None = None  # None: peft's default for the architecture (BERT: query, value)
    bias: Literal["none", "all", "lora_only"] = "none"


class LoRA(PeftMethod):
    name = "lora"
    options_class = LoraOptions
    use_dora = False

    def peft_config(self, ctx: MethodContext) -> Any:
        from peft import LoraConfig

        o = self.options
        return LoraConfig(
            r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules, bias=o.bias,
            use_dora=self.use_dora, **seq_cls_kwargs(ctx),
        )
