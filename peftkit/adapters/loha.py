"""LoHa (Hyeon-Woo et al., 2022) through peft: update = Hadamard product of two low-rank products.

(B1·A1) ⊙ (B2·A2) reaches a higher effective rank than LoRA for the same parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.adapters._peft import OptionsAsPeftConfig


@dataclass
class LohaOptions:
    r: int = 8
    alpha: int = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    target_modules: list[str] | None = field(default_factory=lambda: ["query", "value"])


class LoHa(OptionsAsPeftConfig):
    name = "loha"
    options_class = LohaOptions
    peft_config_name = "LoHaConfig"
