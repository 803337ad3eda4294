"""The divergence guard: a non-finite loss stops the run, and non-finite weights are never written.

The loop reports each step's loss, its weights before every evaluation (the last step's included, which no loss
sees) and every checkpoint it completes; the guard raises a one-line PeftkitError naming the step and the last good
checkpoint. The advice is to start again: a resume continues the same run bitwise (it refuses a changed train.lr),
so it would diverge again at the same step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from peftkit.errors import PeftkitError


class DivergenceGuard:
    def __init__(self, run_dir: Path, last_checkpoint: Path | None = None):
        self.run_dir, self.last_checkpoint = run_dir, last_checkpoint

    def _where(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written before it; lower train.lr (or raise train.warmup_ratio) and start again"
        return (
            f"last good checkpoint: {self.last_checkpoint} (its weights, for a look); start again with a lower "
            "train.lr (or a higher train.warmup_ratio): a resume repeats the same steps and would diverge again"
        )

    def check_loss(self, loss: float, step: int) -> None:
        """`step` is the optimizer step being taken (1-based)."""
        if not math.isfinite(loss):
            raise PeftkitError(
                f"training diverged: the loss is {loss} at step {step}; nothing was saved from it; {self._where()}"
            )

    def check_weights(self, tensors: dict[str, torch.Tensor] | nn.Module, step: int, what: str = "adapter") -> None:
        """Refuse to write `what` when any tensor holds NaN or infinity."""
        if isinstance(tensors, nn.Module):
            tensors = {n: p for n, p in tensors.named_parameters() if p.requires_grad}
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise PeftkitError(
                    f"training diverged: {name} holds non-finite values at step {step}; the {what} "
                    f"was not written; {self._where()}"
                )

    def checkpoint_written(self, path: Path) -> None:
        self.last_checkpoint = path
