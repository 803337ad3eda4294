"""Resumable training checkpoints, safetensors and JSON only.

A checkpoint holds the trainable weights, the optimizer state (tensors flattened into safetensors, the rest in
JSON), the scheduler state, the RNG states and the loop's position in the data order, so a resumed run takes the
same steps it would have taken without the interruption.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from peftkit.adapters.base import trainable_state
from peftkit.errors import PeftkitError
from peftkit.io import atomic_directory, atomic_write_json, load_tensors, read_json, save_tensors
from peftkit.resume import write_manifest


@dataclass
class TrainState:
    """Where the loop is: enough to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    examples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    train_seconds: float = 0.0
    evals_since_best: int = 0  # early stopping's count (train.patience)
    # the logging window open at a checkpoint (its loss sums, written only then), so a resumed log reads the same
    window_steps: int = 0
    window_task_loss: float = 0.0
    window_total_loss: float = 0.0

    def keep_window(self, steps: int, task_loss: torch.Tensor, total_loss: torch.Tensor) -> None:
        """Before a checkpoint: the logging window's sums (one host sync, at checkpoints only)."""
        self.window_steps, self.window_task_loss, self.window_total_loss = steps, float(task_loss), float(total_loss)

    def open_window(self, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The logging window to continue: empty for a new run, the checkpoint's for a resumed one."""
        sums = (torch.tensor(v, device=device) for v in (self.window_task_loss, self.window_total_loss))
        return self.window_steps, *sums


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    best_weights: dict[str, torch.Tensor] | None,
    keep: int = 2,
    config_view: dict | None = None,
) -> Path:
    final = folder / f"step-{state.step:07d}"
    with atomic_directory(final, overwrite=True) as tmp:
        save_tensors(tmp / "trainable.safetensors", trainable_state(model))
        if best_weights is not None:
            save_tensors(tmp / "best.safetensors", best_weights)
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, slots in opt["state"].items():
            for key, value in slots.items():
                (tensors if torch.is_tensor(value) else scalars)[f"{index}.{key}"] = value
        save_tensors(tmp / "optimizer.safetensors", tensors)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_tensors(tmp / "rng.safetensors", rng)
        atomic_write_json(
            tmp / "state.json",
            {
                "train_state": asdict(state),
                "optimizer_param_groups": opt["param_groups"],
                "optimizer_scalars": scalars,
                "scheduler": scheduler.state_dict(),
                "python_random": _to_json(random.getstate()),
            },
        )
        write_manifest(tmp, config_view)  # last: sha256 of every file, and the run's config (see resume.py)
    # a later step's folder is from before a resume that fell back past it (damaged): this run rewrites that step,
    # so it goes, and the newest step folder is always the newest checkpoint (resume reads no other pointer)
    steps = sorted(folder.glob("step-*"))
    for old in [p for p in steps if p.name > final.name] + [p for p in steps if p.name <= final.name][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    meta = read_json(path / "state.json")
    weights = load_tensors(path / "trainable.safetensors")
    expected = set(trainable_state(model))
    if set(weights) != expected:
        raise PeftkitError(
            f"checkpoint {path} does not match this run's trainable parameters (different method or model?)"
        )
    model.load_state_dict(weights, strict=False)
    flat = {**load_tensors(path / "optimizer.safetensors"), **meta["optimizer_scalars"]}
    opt_state: dict[int, dict] = {}
    for key, value in flat.items():
        index, _, slot = key.partition(".")
        opt_state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer_param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda.0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count())])
    random.setstate(_from_json(meta["python_random"]))
    best = load_tensors(path / "best.safetensors") if (path / "best.safetensors").exists() else None
    return TrainState(**meta["train_state"]), best


def _to_json(value):
    return [_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _from_json(value):
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value
