"""LN-tuning (Qi et al., 2022) through peft: trains only the LayerNorm gains and biases (plus the head)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.adapters._peft import OptionsAsPeftConfig


@dataclass
class LnTuningOptions:
    # BERT-likes name their norms `LayerNorm`; Llama-likes input_layernorm/post_attention_layernorm (peft's default)
    target_modules: list[str] | None = field(default_factory=lambda: ["LayerNorm"])


class LNTuning(OptionsAsPeftConfig):
    name = "ln_tuning"
    options_class = LnTuningOptions
    peft_config_name = "LNTuningConfig"
    targets_norms = True
