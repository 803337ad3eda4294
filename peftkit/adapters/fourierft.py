"""FourierFT (Gao et al., 2024) through peft: n trained spectral coefficients per weight, inverse-FFT'd.

The frequencies are fixed and random (seeded); the update is the inverse 2-D Fourier transform."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.adapters._peft import OptionsAsPeftConfig


@dataclass
class FourierftOptions:
    n_frequency: int = 1000  # trained coefficients per weight matrix (the paper's GLUE setting)
    scaling: float = 150.0  # the paper's GLUE setting for base-size encoders
    random_loc_seed: int = 777  # seed of the frequency locations (stored in the adapter config)
    target_modules: list[str] | None = field(default_factory=lambda: ["query", "value"])


class FourierFT(OptionsAsPeftConfig):
    name = "fourierft"
    options_class = FourierftOptions
    peft_config_name = "FourierFTConfig"
