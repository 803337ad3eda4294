"""DoRA (Liu et al., 2024) through peft: LoRA on the direction of each weight plus a trained magnitude vector."""

from __future__ import annotations

from dataclasses import dataclass

from peftkit.adapters.lora import LoRA, LoraOptions


@dataclass
class DoraOptions(LoraOptions):
    """Same knobs as LoRA."""


class DoRA(LoRA):
    name = "dora"
    options_class = DoraOptions
    use_dora = True
    frozen_linears_in_bf16 = False  # peft's DoRA reads the base weight itself for its column norms
