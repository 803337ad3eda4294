"""HRA (Yuan et al., 2024) through peft: weights times a chain of r trained Householder reflections.

An orthogonal update that is also low-rank."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.adapters._peft import OptionsAsPeftConfig


@dataclass
class HraOptions:
    r: int = 8  # number of Householder reflections (even numbers initialise as the identity)
    apply_GS: bool = False  # Gram-Schmidt orthogonalise the reflection vectors (peft spells it this way)
    target_modules: list[str] | None = field(default_factory=lambda: ["query", "value"])


class HRA(OptionsAsPeftConfig):
    name = "hra"
    options_class = HraOptions
    peft_config_name = "HRAConfig"
