"""Trainable embedding tables get their gradient as the batch's rows, added into one buffer kept for the run.

Why: a dense embedding backward allocates a fresh zero-filled [vocab x hidden] gradient every step (47 MB for
MiniLM's 30,522-token table). An allocation that large is new mmap'd memory each time, so the CPU pays a page fault
per 4 KB page and then the fill: a full fine-tuning step on sst2 went from 241 to 199 ms without it (profiled:
`benchmarks/embedding_grads.py --profile`). With `nn.Embedding.sparse` the backward yields only the rows the batch
used, and autograd adds them in place into an existing dense `.grad`; so the optimizer, clipping and weight decay
see the same dense gradient as before, and the numbers do not change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

MIN_ELEMENTS = 1 << 18  # 1 MB of fp32: smaller tables (positions, token types) cost nothing worth saving


@dataclass
class EmbeddingGradBuffers:
    """The embeddings switched to row gradients, each with the dense gradient buffer it keeps for the run."""

    kept: list[tuple[nn.Embedding, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def keep(cls, model: nn.Module) -> EmbeddingGradBuffers:
        """Switch every large, trainable, unshared fp32 `nn.Embedding` of `model` to row gradients."""
        uses = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
        kept = []
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, nn.Embedding) or module.sparse or not isinstance(weight, torch.Tensor):
                continue
            if not weight.requires_grad or weight.dtype != torch.float32 or weight.numel() < MIN_ELEMENTS:
                continue
            if uses[id(weight)] > 1 or weight.grad is not None:  # tied to an output layer, or already accumulating
                continue
            module.sparse = True
            weight.grad = torch.zeros_like(weight)
            kept.append((module, weight.grad))
        return cls(kept)

    def zero(self) -> None:
        """After `optimizer.zero_grad(set_to_none=True)`: give each embedding its own buffer back, zeroed."""
        for module, grad in self.kept:
            module.weight.grad = grad.zero_()

    def release(self) -> None:
        """Dense backward again and the buffers dropped: the model leaves training as it came."""
        for module, _ in self.kept:
            module.sparse = False
            module.weight.grad = None
        self.kept = []
