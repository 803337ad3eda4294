"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021), written here because peft has none.

An adapter is `x + up(act(down(x)))` applied to the output of a sublayer's output projection, before the residual
add and layer norm. `houlsby` puts one after the attention output and one after the feed-forward output of every
layer; `pfeiffer` only after the feed-forward output. The up-projection starts at zero, so a fresh adapter is the
identity and training starts from the pretrained model's behaviour.

Adapters attach with forward hooks and live as `bottleneck_adapter` submodules of the sublayer, so the base
model's own parameter names are untouched and a plain state dict saves and loads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import nn

from peftkit.adapters.base import Method, MethodContext, freeze, unfreeze_head
from peftkit.config_values import Positive, Range
from peftkit.errors import PeftkitError

# model_type -> (attention output projection, feed-forward output projection), relative to one layer.
ADAPTER_SITES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        ["bert", "roberta", "xlm-roberta", "electra", "camembert", "mpnet"], ("attention.output.dense", "output.dense")
    ),
    "distilbert": ("attention.out_lin", "ffn.lin2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"], ("self_attn.o_proj", "mlp.down_proj")),
}

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class BottleneckOptions:
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"  # houlsby: after attention and feed-forward; pfeiffer: FFN
    reduction_factor: Positive = 16  # bottleneck = hidden_size // reduction_factor
    bottleneck_size: Positive | None = None  # overrides reduction_factor when set
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    init_std: Annotated[float, Range(gt=0)] = 1e-2  # std of the down-projection; the up-projection starts at zero


class Bottleneck(nn.Module):
    """down -> activation -> up, with a residual around it."""

    def __init__(self, hidden_size: int, bottleneck: int, activation: str, init_std: float):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def _add_adapter_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.bottleneck_adapter_ref(output)


class BottleneckAdapter(Method):
    name = "bottleneck"
    options_class = BottleneckOptions
    frozen_linears_in_bf16 = True
    merge_blocker = "a bottleneck adapter is a non-linear module (down, activation, up), so no weight update equals it"

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        opts = self.options
        model_type = model.config.model_type
        if model_type not in ADAPTER_SITES:
            raise PeftkitError(
                f"bottleneck adapters do not know the layer layout of model type {model_type!r}; "
                f"supported: {', '.join(sorted(ADAPTER_SITES))}"
            )
        attention_site, ffn_site = ADAPTER_SITES[model_type]
        sites = [ffn_site] if opts.placement == "pfeiffer" else [attention_site, ffn_site]
        hidden = model.config.hidden_size
        size = opts.bottleneck_size or max(1, hidden // opts.reduction_factor)

        freeze(model)
        pattern = re.compile(r"\.\d+\.(" + "|".join(re.escape(s) for s in sites) + r")$")
        targets = [(n, m) for n, m in model.named_modules() if pattern.search(n)]
        if not targets:
            raise PeftkitError(f"found no adapter sites {sites} in this {model_type} model")
        for name, target in targets:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            adapter = Bottleneck(hidden, size, opts.activation, opts.init_std)
            adapter.to(device=next(target.parameters()).device)
            parent.bottleneck_adapter = adapter  # registered here so its weights are in the state dict
            object.__setattr__(target, "bottleneck_adapter_ref", adapter)  # plain attribute: no double registration
            target.register_forward_hook(_add_adapter_output)
        unfreeze_head(model, ctx.head_modules)
        return model
