"""VeRA (Kopiczko et al., 2024) through peft: shared frozen random matrices, trained per-layer scaling vectors.

Far fewer parameters than LoRA at a much higher rank (256 by default)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.adapters._peft import OptionsAsPeftConfig


@dataclass
class VeraOptions:
    r: int = 256  # rank of the shared random projections (the paper's default)
    target_modules: list[str] | None = field(default_factory=lambda: ["query", "value"])
    vera_dropout: float = 0.0
    d_initial: float = 0.1  # initial value of the d scaling vector
    projection_prng_key: int = 0  # seed of the shared random matrices
    save_projection: bool = True  # store the random matrices in the adapter (reload without re-deriving them)


class VeRA(OptionsAsPeftConfig):
    name = "vera"
    options_class = VeraOptions
    peft_config_name = "VeraConfig"
