"""AdaLoRA (Zhang et al., 2023) through peft: SVD-shaped LoRA whose rank budget is reallocated during training.

The budget moves only if `update_and_allocate` runs after every optimizer step (peft raises nothing when it is
forgotten), so this method uses the loop's `after_optimizer_step` hook. Its schedule needs the run's total step
count, which the loop passes in `MethodContext.total_steps`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from torch import nn

from peftkit.adapters._peft import PeftMethod, seq_cls_kwargs
from peftkit.adapters.base import MethodContext
from peftkit.config_values import NonNegative, Positive, Probability, Range
from peftkit.errors import PeftkitError


@dataclass
class AdaLoraOptions:
    init_r: Positive = 12  # starting rank of every module
    target_r: Positive = 8  # average rank after pruning
    alpha: Annotated[float, Range(gt=0)] = 32
    dropout: Probability = 0.1
    target_modules: list[str] | None = None
    tinit_ratio: Probability = 0.1  # share of steps before pruning starts
    tfinal_ratio: Probability = 0.2  # share of steps at the end with the final budget fixed
    delta_t: Positive = 10  # steps between budget reallocations
    beta1: Probability = 0.85
    beta2: Probability = 0.85
    orth_reg_weight: NonNegative = 0.1


class AdaLoRA(PeftMethod):
    name = "adalora"
    quantizable = True
    options_class = AdaLoraOptions
    frozen_linears_in_bf16 = True
    restore_best = False  # pruned ranks change over the run; an earlier snapshot would not match the final pattern
    resume_blocker = "peft keeps its rank allocator's importance scores and rank pattern outside the weights"
    stock_peft_note = (
        "peft may warn that the saved rank_pattern keys 'did not match any targeted module and were ignored'; they "
        "are applied (its check does not read AdaLoRA's `.lora_E` names), and the loaded model gives peftkit's outputs"
    )

    def peft_config(self, ctx: MethodContext) -> Any:
        from peft import AdaLoraConfig

        o = self.options
        total = max(ctx.total_steps, 1)
        tinit, tfinal = int(o.tinit_ratio * total), int(o.tfinal_ratio * total)
        if tinit + tfinal >= total:
            raise PeftkitError(
                f"adalora needs steps to prune in: tinit ({tinit}) + tfinal ({tfinal}) must be below the "
                f"run's {total} steps; lower method.tinit_ratio/method.tfinal_ratio or train longer"
            )
        return AdaLoraConfig(
            init_r=o.init_r,
            target_r=o.target_r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=o.target_modules,
            total_step=total,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=o.delta_t,
            beta1=o.beta1,
            beta2=o.beta2,
            orth_reg_weight=o.orth_reg_weight,
            **seq_cls_kwargs(ctx),
        )

    def load(self, base: nn.Module, directory: Path, ctx: MethodContext) -> nn.Module:
        # peft re-creates the modules at init_r, warns that the saved rank_pattern keys (ending in `.lora_E`) "did not
        # match any targeted module", then resizes by that pattern anyway: the reload reproduces the trained model's
        # validation loss exactly (tests/test_methods.py), so the warning is noise here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
            return super().load(base, directory, ctx)

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        model.base_model.update_and_allocate(step)
