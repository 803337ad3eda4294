"""BOFT (Liu et al., 2024) through peft: orthogonal fine-tuning with butterfly-factorised rotations.

The product of sparse butterfly factors covers the full width with few parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.adapters._peft import OptionsAsPeftConfig


@dataclass
class BoftOptions:
    boft_block_size: int = 4  # set this or boft_block_num (0: derived); must divide the layer width
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1  # 1 = plain block-diagonal OFT; more factors mix more widely
    boft_dropout: float = 0.0
    target_modules: list[str] | None = field(default_factory=lambda: ["query", "value"])


class BOFT(OptionsAsPeftConfig):
    name = "boft"
    options_class = BoftOptions
    peft_config_name = "BOFTConfig"
