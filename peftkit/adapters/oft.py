"""OFT (Qiu et al., 2023) through peft: a trained block-diagonal orthogonal rotation of each weight's neurons.

The rotation keeps the angles between neurons (hyperspherical energy) unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.adapters._peft import OptionsAsPeftConfig


@dataclass
class OftOptions:
    oft_block_size: int = 32  # size of each orthogonal block (must divide the layer width); r is derived from it
    r: int = 0  # number of blocks; set this or oft_block_size, not both (0: derived)
    module_dropout: float = 0.0
    coft: bool = False  # constrained OFT: keep the rotation within eps of the identity
    eps: float = 6e-5
    block_share: bool = False  # one rotation shared by all blocks of a layer
    target_modules: list[str] | None = field(default_factory=lambda: ["query", "value"])


class OFT(OptionsAsPeftConfig):
    name = "oft"
    options_class = OftOptions
    peft_config_name = "OFTConfig"
