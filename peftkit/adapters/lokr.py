"""LoKr (Edalati et al., 2022) through peft: update = Kronecker product of a small and a low-rank matrix."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.adapters._peft import OptionsAsPeftConfig


@dataclass
class LokrOptions:
    r: int = 8
    alpha: int = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    decompose_both: bool = False  # low-rank decompose the left Kronecker factor too
    decompose_factor: int = -1  # -1: split each dimension as evenly as possible
    target_modules: list[str] | None = field(default_factory=lambda: ["query", "value"])


class LoKr(OptionsAsPeftConfig):
    name = "lokr"
    options_class = LokrOptions
    peft_config_name = "LoKrConfig"
