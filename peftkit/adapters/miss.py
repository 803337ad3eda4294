"""MiSS (Kang & Yin, 2025; formerly Bone) through peft: one trained shard shared across each weight's blocks.

r must not exceed the layer width."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.adapters._peft import OptionsAsPeftConfig


@dataclass
class MissOptions:
    r: int = 64  # shard size (peft's default); must not exceed the layer's in_features
    mini_r: int = 1
    miss_dropout: float = 0.0
    target_modules: list[str] | None = field(default_factory=lambda: ["query", "value"])


class MiSS(OptionsAsPeftConfig):
    name = "miss"
    options_class = MissOptions
    peft_config_name = "MissConfig"
