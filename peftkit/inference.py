"""Batched forward passes for evaluation and prediction, shared by the loop, `peftkit eval`, predict and serve."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from peftkit.data import EncodedSplit, collate, compute_metrics


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast when asked (CPU with AVX512-BF16, or CUDA), otherwise a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.inference_mode()
def predict_logits(model: nn.Module, split: EncodedSplit, batch_size: int, pad_token_id: int,
                   device: torch.device, bf16: bool = False) -> torch.Tensor:
    """Logits for every row of `split`, in order, as float32 on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        batch = collate(split, list(range(start, min(start + batch_size, len(split)))), pad_token_id)
        batch.pop("labels", None)
        with autocast(device, bf16):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        out.append(logits.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, split: EncodedSplit, num_labels: int, batch_size: int, pad_token_id: int,
             device: torch.device, bf16: bool = False) -> dict[str, float]:
    """Task metrics plus mean cross-entropy on a labelled split."""
    logits = predict_logits(model, split, batch_size, pad_token_id, device, bf16)
    labels = torch.tensor(split.labels)
    metrics = compute_metrics(logits.argmax(-1).tolist(), split.labels, num_labels)
    metrics["loss"] = float(nn.functional.cross_entropy(logits, labels))
    return metrics
