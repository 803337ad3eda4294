"""LoRA (Hu et al., 2021) through peft: a trainable low-rank update B·A beside frozen weight matrices.

Variants are options, not new methods:
- `init`: `default` (peft's: Kaiming-uniform A, zero B), `gaussian` (Gaussian A), `pissa` (A, B from the top singular
  vectors of W; the base keeps the residual), `olora` (from a QR decomposition of W; likewise), `eva` (A from the SVD
  of layer inputs on a few training batches, ranks redistributed), `corda` (context-oriented SVD of W with the
  covariance of layer inputs on a few training batches; the base keeps the residual; REFUSED for now: peft 0.21.2's
  `preprocess_corda` fails on [batch, seq, hidden] layer inputs, see benchmarks/results/lora_inits.md; the code path
  is kept for a fixed peft). `loftq` is refused: it
  replaces the base weights by their quantize-dequantize approximation and expects that modified base to be shipped,
  while a peftkit adapter loads onto the original base.
- PiSSA, OLoRA and CorDA change the base weights. Saving converts the trained adapter into an ordinary LoRA of rank
  2r against the ORIGINAL base (what peft's `path_initial_model_for_weight_conversion` does, but keeping the head),
  so the folder loads onto the unmodified base, in stock peft too; logits match up to float rounding, not bit for
  bit. Training checkpoints (resume) hold the unconverted weights and re-derive the residual base on resume.
- `use_rslora`: scale by alpha/sqrt(r) instead of alpha/r (Kalajdzievski, 2023).
- `target_modules: all-linear`: every linear layer except the head (peft's special value).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from torch import nn

from peftkit.adapters._peft import PeftMethod, peft_state_dict, seq_cls_kwargs
from peftkit.adapters.base import MethodContext
from peftkit.config_values import Positive, Probability, Range
from peftkit.errors import PeftkitError

CHANGES_BASE = ("pissa", "olora", "corda")  # saved converted to a plain LoRA against the original base
NEEDS_DATA = ("eva", "corda")
CORDA_REASON = (
    "init corda fails inside peft 0.21.2's preprocess_corda on encoder layer inputs ([batch, seq, hidden]: "
    "'t() expects a tensor with <= 2 dimensions, but self is 3D'); use init eva, pissa or olora"
)
LOFTQ_REASON = (
    "init loftq replaces the base weights by their quantize-dequantize approximation and expects that "
    "modified base to be shipped, while a peftkit adapter loads onto the original base; use "
    "model.quantization=4bit with init default/pissa instead"
)


@dataclass
class LoraOptions:
    r: Positive = 8
    alpha: Annotated[float, Range(gt=0)] = 16
    dropout: Probability = 0.1
    target_modules: list[str] | None = None  # None: peft's default for the architecture (BERT: query, value)
    bias: Literal["none", "all", "lora_only"] = "none"
    # corda and loftq are refused with the reason (see the module docstring)
    init: Literal["default", "gaussian", "pissa", "olora", "eva", "corda", "loftq"] = "default"
    use_rslora: bool = False  # alpha/sqrt(r) scaling
    calibration_batches: Positive = 8  # training batches eva/corda read at apply time

    def __post_init__(self):
        if self.init == "loftq":
            raise PeftkitError(LOFTQ_REASON)
        if self.init == "corda":
            raise PeftkitError(CORDA_REASON)


class LoRA(PeftMethod):
    name = "lora"
    quantizable = True
    options_class = LoraOptions
    use_dora = False
    frozen_linears_in_bf16 = True

    def peft_config(self, ctx: MethodContext) -> Any:
        from peft import LoraConfig

        o = self.options
        init: Any = {"default": True}.get(o.init, o.init)
        extra: dict[str, Any] = {}
        if o.init == "eva":
            from peft import EvaConfig

            extra["eva_config"] = EvaConfig(rho=2.0)
        elif o.init == "corda":
            from peft.tuners.lora.config import CordaConfig

            extra["corda_config"] = CordaConfig(corda_method="ipm")
        return LoraConfig(
            r=o.r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=o.target_modules,
            bias=o.bias,
            use_dora=self.use_dora,
            init_lora_weights=init,
            use_rslora=o.use_rslora,
            **extra,
            **seq_cls_kwargs(ctx),
        )

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        o = self.options
        if o.init not in NEEDS_DATA:
            model = super().apply(model, ctx)
        else:
            model = self._apply_with_data(model, ctx)
        if o.init in CHANGES_BASE:  # the initial A0, B0: save() converts against them to a plain LoRA
            self._initial = {
                k: v.detach().clone() for k, v in peft_state_dict(model).items() if ".lora_A." in k or ".lora_B." in k
            }
        return model

    def _apply_with_data(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        import torch
        from peft import get_peft_model

        o = self.options
        if ctx.calibration is None:
            raise PeftkitError(
                f"LoRA init {o.init} reads layer inputs from training batches; it runs through "
                "peftkit train (which passes them), not on a bare model"
            )
        batches = [{k: v for k, v in b.items() if k != "labels"} for b in ctx.calibration(o.calibration_batches)]
        config = self.checked_config(model, ctx)
        if o.init == "eva":
            from peft import initialize_lora_eva_weights

            model = get_peft_model(model, config, low_cpu_mem_usage=True)
            initialize_lora_eva_weights(model, batches, show_progress_bar=False)
            return model
        try:
            from peft.tuners.lora.corda import preprocess_corda
        except ImportError as e:  # peft's corda module imports `attr` (the attrs package), not a peft dependency
            raise PeftkitError(
                f"LoRA init corda needs a package peft's corda module imports ({e}); pip install attrs"
            ) from None

        def run_model():
            with torch.no_grad():
                for batch in batches:
                    model(**batch)

        preprocess_corda(model, config, run_model=run_model)
        return get_peft_model(model, config)

    def save(self, model: nn.Module, directory: Path) -> None:
        super().save(model, directory)
        if getattr(self, "_initial", None) is not None:
            convert_to_plain_lora(Path(directory), self._initial)


def convert_to_plain_lora(directory: Path, initial: dict[str, Any]) -> None:
    """Rewrite a saved PiSSA/OLoRA/CorDA adapter as an ordinary LoRA against the ORIGINAL base weights.

    The base kept W_res = W - s·B0·A0 and training reached W_res + s·B·A = W + s·(B·A - B0·A0)
    = W + s·[B, -B0]·[A; A0]:
    a LoRA of rank 2r with the same scaling. peft's own conversion (`path_initial_model_for_weight_conversion`) does
    the same but drops modules_to_save (the task head) from the file, so it is done here.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from peftkit.io import atomic_write_json, read_json

    weights_path = directory / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    for key, tensor in list(weights.items()):
        if key in initial and ".lora_A." in key:
            weights[key] = torch.cat([tensor, initial[key].to(tensor.dtype)], dim=0).contiguous()
        elif key in initial and ".lora_B." in key:
            weights[key] = torch.cat([tensor, -initial[key].to(tensor.dtype)], dim=1).contiguous()
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    config = read_json(directory / "adapter_config.json")
    config["r"] *= 2  # scaling alpha/r (or alpha/sqrt(r) with rsLoRA) must stay the same at rank 2r
    config["lora_alpha"] *= 2**0.5 if config.get("use_rslora") else 2
    config["init_lora_weights"] = True
    atomic_write_json(directory / "adapter_config.json", config)
