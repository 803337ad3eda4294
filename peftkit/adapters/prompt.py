"""Prompt tuning (Lester et al., 2021) through peft: trainable virtual-token embeddings prepended to the input.

peft trains and saves the classification head beside the prompt (task type SEQ_CLS wraps `classifier`/`score`
in modules_to_save); our tests check that the saved folder reloads with identical logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from peftkit.adapters._peft import PeftMethod
from peftkit.adapters.base import MethodContext
from peftkit.config_values import Positive


@dataclass
class PromptOptions:
    num_virtual_tokens: Positive = 20
    init: Literal["random", "text"] = "random"  # text: start from the embeddings of init_text's tokens
    init_text: str = "Classify this text:"


class PromptTuning(PeftMethod):
    name = "prompt"
    options_class = PromptOptions
    frozen_linears_in_bf16 = True
    merge_blocker = "prompt tuning adds virtual tokens to the input; there are no weight updates to fold in"

    def peft_config(self, ctx: MethodContext) -> Any:
        from peft import PromptTuningConfig, PromptTuningInit, TaskType

        o = self.options
        text = (
            {
                "prompt_tuning_init": PromptTuningInit.TEXT,
                "prompt_tuning_init_text": o.init_text,
                "tokenizer_name_or_path": ctx.model_path,
            }
            if o.init == "text"
            else {}
        )
        return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=o.num_virtual_tokens, **text)
