"""Batched forward passes for evaluation and prediction, shared by the loop, `peftkit eval`, predict and serve."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.data import EncodedSplit, collate, compute_metrics, encode
from peftkit.errors import PeftkitError
from peftkit.precision import autocast, resolve_bf16

__all__ = ["EvalResult", "autocast", "evaluate", "evaluate_run", "predict_logits", "score_logits"]


@torch.inference_mode()
def predict_logits(
    model: nn.Module, split: EncodedSplit, batch_size: int, device: torch.device, bf16: bool | None = False
) -> torch.Tensor:
    """Logits for every row of `split`, in input order, as float32 on the CPU.

    Rows are batched longest first (so each batch pads little) and put back in input order. `bf16=None` turns
    autocast on where it pays (`peftkit.precision.bf16_pays`).
    """
    bf16 = resolve_bf16(bf16, device)
    was_training = model.training
    model.eval()
    lengths = split.lengths()
    order = sorted(range(len(split)), key=lambda i: -lengths[i])
    out = []
    for start in range(0, len(order), batch_size):
        batch = collate(split, order[start : start + batch_size])
        batch.pop("labels", None)
        with autocast(device, bf16):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        out.append(logits.float().cpu())
    model.train(was_training)
    if not out:
        return torch.empty(0)
    sorted_logits = torch.cat(out)
    logits = torch.empty_like(sorted_logits)
    logits[torch.tensor(order)] = sorted_logits
    return logits


def format_predictions(logits: torch.Tensor, label_names: list[str]) -> list[dict[str, Any]]:
    """One dict per row: the predicted label index, its name, and every label's probability (6 decimals)."""
    probs = torch.softmax(logits.float(), dim=-1)
    out = []
    for row in probs.tolist():
        label = max(range(len(row)), key=row.__getitem__)
        out.append(
            {
                "label": label,
                "label_name": label_names[label],
                "probabilities": {name: round(p, 6) for name, p in zip(label_names, row)},
            }
        )
    return out


def evaluate(
    model: nn.Module,
    split: EncodedSplit,
    num_labels: int,
    batch_size: int,
    device: torch.device,
    bf16: bool | None = False,
) -> dict[str, float]:
    """Task metrics plus mean cross-entropy on a labelled split."""
    return score_logits(predict_logits(model, split, batch_size, device, bf16), split.labels, num_labels)


def score_logits(logits: torch.Tensor, labels: list[int], num_labels: int) -> dict[str, float]:
    """Task metrics plus mean cross-entropy of logits already computed (so one forward pass serves every metric)."""
    metrics = compute_metrics(logits.argmax(-1).tolist(), labels, num_labels)
    metrics["loss"] = float(nn.functional.cross_entropy(logits, torch.tensor(labels)))
    return metrics


@dataclass
class EvalResult:
    """What `evaluate_run` (and `peftkit eval`) measured. `metrics` stays a mapping: its keys depend on the task
    (binary f1) and on the --metric modules (`<module>:<key>`)."""

    split: str
    examples: int  # rows scored
    bf16: bool  # the precision it ran in, resolved
    metrics: dict[str, float]  # accuracy, macro_f1, f1 (binary tasks), loss, then any user metric's keys

    def to_dict(self) -> dict[str, Any]:
        """The JSON `peftkit eval` prints: split, examples, bf16, then each metric at the top level."""
        return {"split": self.split, "examples": self.examples, "bf16": self.bf16, **self.metrics}


def evaluate_run(
    run_dir: str | Path,
    split: str = "validation",
    device: str = "auto",
    batch_size: int = 64,
    data_dir: str | None = None,
    user_metrics: Sequence[str] = (),
    bf16: bool | None = None,
) -> EvalResult:
    """Score a finished run's adapter on a split of its task (read again from the run's config.yaml).

    `user_metrics`: evaluate module specs (peftkit.user_metrics), scored as `<module>:<key>` beside the built-in
    metrics; they are loaded first, so a bad one fails before the model loads. `bf16`: autocast or not; None = as
    the run evaluated (`run_bf16`), so eval reproduces the run's own numbers.
    """
    from peftkit.artifacts import load
    from peftkit.data import load_task
    from peftkit.modeling import resolve_device
    from peftkit.recipe_files import load_config
    from peftkit.user_metrics import load_user_metrics, score_user_metrics

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise PeftkitError(f"{run_dir} is not a run folder (no config.yaml)")
    extra_metrics = load_user_metrics(user_metrics)
    config = load_config(config_file=str(run_dir / "config.yaml"))
    if data_dir:
        config.task.data_dir = data_dir
    loaded = load(run_dir / "adapter")
    target = resolve_device(device)
    loaded.model.to(target)
    task = load_task(config.task, seed=config.train.seed)
    if task.label_names != loaded.label_names:  # label i must mean what it meant in training, or the scores lie
        raise PeftkitError(
            f"task {task.name!r} now reads with labels {task.label_names} but the adapter was trained on "
            f"{loaded.label_names}; evaluate on data with the adapter's labels, in its order"
        )
    encoded = encode(task.split(split), loaded.tokenizer, config.task.max_length)
    if encoded.labels is None:
        raise PeftkitError(f"split {split!r} of task {task.name!r} has no labels to evaluate against")
    bf16 = resolve_bf16(run_bf16(run_dir, config) if bf16 is None else bf16, target)
    logits = predict_logits(loaded.model, encoded, batch_size, target, bf16)
    metrics = score_logits(logits, encoded.labels, task.num_labels)
    metrics.update(score_user_metrics(extra_metrics, logits.argmax(-1).tolist(), encoded.labels))
    return EvalResult(split, len(encoded), bf16, metrics)


def run_bf16(run_dir: Path, config: Any) -> bool | None:
    """The precision a run evaluated in: what its summary.json recorded (train.bf16 resolved on its machine), else
    its config's train.bf16 (null: where it pays)."""
    from peftkit.formats import SUMMARY_FILE, RunSummary

    return RunSummary.read(run_dir).bf16 if (run_dir / SUMMARY_FILE).is_file() else config.train.bf16
