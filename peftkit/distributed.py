"""Training across processes under `torchrun`: process group, DDP or FSDP2 wrapping, and full state for saving.

`train.distributed: ddp` (default) keeps a full copy of the model on every rank and averages gradients
(`DistributedDataParallel`). `train.distributed: fsdp` shards it with PyTorch's own FSDP2
(`torch.distributed.fsdp.fully_shard`): each transformer block, then the root (embeddings, head), so frozen base
weights, trainable weights, gradients and AdamW moments are all split across ranks.

Saving under FSDP gathers full tensors, one at a time, onto rank 0, which writes them in the same safetensors + JSON
layout as a one-process run (checkpoint.py, unchanged): checkpoints and exported adapters do not depend on how a run
was sharded, and nothing is pickled (no `torch.distributed.checkpoint`, whose metadata is a pickle). Loading a
checkpoint scatters the full tensors back into each rank's shard.

Every rank loads the full base model before sharding it, so the load itself still needs one full copy per rank;
what sharding saves is the training state held from then on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftkit.checkpoint import TrainState, load_checkpoint, save_checkpoint
from peftkit.errors import PeftkitError
from peftkit.measure import model_state_mb

FSDP_METHODS = ("full", "lora", "dora")  # methods whose weights live in ordinary per-block parameters


@dataclass
class Ranks:
    """Where this process stands under torchrun (WORLD_SIZE/RANK/LOCAL_RANK); one process otherwise."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "ddp"  # train.distributed: ddp | fsdp
    device: torch.device = torch.device("cpu")  # set by init_process_group

    @classmethod
    def from_env(cls, mode: str = "ddp") -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)), mode)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1 and self.mode == "fsdp"

    def init_process_group(self, device: torch.device) -> None:
        if self.world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)  # NCCL uses the current device
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device

    def agree(self, path: Path) -> Path:
        """Every rank must write to rank 0's run folder (names carry a timestamp); sent as bytes, not a pickle."""
        if self.world == 1:
            return path
        data = torch.zeros(4096, dtype=torch.uint8)
        raw = str(path).encode()[:4095]
        data[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        data = data.to(self.device)
        dist.broadcast(data, src=0)
        return Path(bytes(data.cpu().tolist()).rstrip(b"\0").decode())

    def wrap(self, model: nn.Module, method_name: str) -> nn.Module:
        """The module the loop calls: `model` itself (one process), DDP around it, or `model` sharded in place.

        Under FSDP the parameters become DTensor shards, so build the optimizer after this call.
        """
        if self.world == 1:
            return model
        if self.mode == "ddp":
            return nn.parallel.DistributedDataParallel(model)
        if method_name not in FSDP_METHODS:
            raise PeftkitError(
                f"train.distributed=fsdp supports the methods {', '.join(FSDP_METHODS)}, not "
                f"{method_name!r}; use train.distributed=ddp"
            )
        if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters()):
            raise PeftkitError(
                "train.distributed=fsdp cannot shard a bitsandbytes-quantized base; use train.distributed=ddp"
            )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        blocks = transformer_blocks(model)
        if not blocks:
            raise PeftkitError(
                f"train.distributed=fsdp found no transformer blocks in {type(model).__name__} "
                "(no _no_split_modules); use train.distributed=ddp"
            )
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embeddings, final norms, the task head
        return model

    # ------------------------------------------------------------------ checkpoints and weights across shards

    def save_checkpoint(
        self,
        folder: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        state: TrainState,
        best_weights: dict[str, torch.Tensor] | None,
        config_view: dict | None = None,
    ) -> Path:
        """Called on every rank; rank 0 writes. Under FSDP all ranks first gather the full tensors onto rank 0.
        Returns the checkpoint's folder (the path it has, or will have, on rank 0)."""
        if not self.sharded:
            if self.is_main:
                return save_checkpoint(
                    folder, model, optimizer, scheduler, state, best_weights, config_view=config_view
                )
            return folder / f"step-{state.step:07d}"
        weights = self._gather({n: p for n, p in model.named_parameters() if p.requires_grad})
        best = self._gather(best_weights) if best_weights is not None else None
        opt = optimizer.state_dict()
        opt["state"] = {i: self._gather(slots) for i, slots in opt["state"].items()}
        if self.is_main:
            return save_checkpoint(
                folder, _FullState(weights), _FullState(optimizer=opt), scheduler, state, best, config_view=config_view
            )
        return folder / f"step-{state.step:07d}"

    def load_checkpoint(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler
    ) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
        """Every rank reads the checkpoint (a shared folder across nodes); under FSDP each keeps its shard."""
        if not self.sharded:
            return load_checkpoint(path, model, optimizer, scheduler)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        full_model, full_opt = _FullState({n: p.new_empty(0) for n, p in params.items()}), _FullState()
        state, best = load_checkpoint(path, full_model, full_opt, scheduler)
        self.load_weights(model, full_model.loaded)
        ordered = [p for group in optimizer.param_groups for p in group["params"]]
        opt = full_opt.loaded
        opt["state"] = {
            i: {k: _shard_like(v, ordered[i]) for k, v in slots.items()} for i, slots in opt["state"].items()
        }
        optimizer.load_state_dict(opt)
        if best is not None:
            best = {n: _shard_like(t, params[n]) for n, t in best.items()}
        return state, best

    def load_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Put full or sharded `weights` (by name) into the model's parameters."""
        if not self.sharded:
            model.load_state_dict(weights, strict=False)
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(_shard_like(value, params[name]))

    def full_model(self, model: nn.Module, rebuild: Callable[[], nn.Module]) -> nn.Module | None:
        """The trained model with full weights, for saving the adapter: `model` itself unless sharded; under FSDP
        (every rank calls this) rank 0 gets a fresh unsharded copy from `rebuild()` with the gathered trainable
        weights, and the other ranks get None."""
        if not self.sharded:
            return model
        weights = self._gather({n: p for n, p in model.named_parameters() if p.requires_grad})
        if not self.is_main:
            return None
        plain = rebuild()
        result = plain.load_state_dict(weights, strict=False)
        if result.unexpected_keys:
            raise PeftkitError(f"rebuilding the model for saving found no place for {result.unexpected_keys[0]}")
        return plain.to(self.device)

    # ------------------------------------------------------------------ measurements over ranks

    def model_state_mb(self, model: nn.Module) -> float:
        """Model-state MB this process holds (its shards under FSDP), the largest over ranks."""
        if not self.sharded:
            return model_state_mb(model)
        total = sum(_local(p).numel() * p.element_size() * (4 if p.requires_grad else 1) for p in model.parameters())
        return round(self._max(total) / (1024 * 1024), 1)

    def peak(self, memory: Any) -> dict[str, Any]:
        """memory.peak() of this process, or under several ranks the largest of each number over the ranks."""
        peak = memory.peak()
        if self.world > 1:
            peak = {k: self._max(v) if isinstance(v, float) else v for k, v in peak.items()}
        return peak

    def finish(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over ranks: each rank's loss is over its own equal shard of the global batch, so their
        mean is the global batch's loss (what one process would log); `value` itself in one process."""
        if self.world == 1:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world

    def _max(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def _gather(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """Full tensors on rank 0 (CPU), one all-gather at a time in the same order on every rank; {} elsewhere."""
        out = {}
        for key, value in tensors.items():
            full = value.full_tensor() if _is_dtensor(value) else value
            if self.is_main:
                out[key] = full.detach().cpu() if torch.is_tensor(full) else full
        return out


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: modules whose class the model lists in `_no_split_modules`."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


class _FullState:
    """What checkpoint.py sees of a sharded model or optimizer: full tensors by name, a full optimizer state."""

    def __init__(self, params: dict[str, torch.Tensor] | None = None, optimizer: dict | None = None):
        self.params, self.optimizer, self.loaded = params or {}, optimizer, None

    def named_parameters(self):
        return ((n, nn.Parameter(t, requires_grad=True)) for n, t in self.params.items())

    def state_dict(self) -> dict:
        return self.optimizer

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.loaded = state


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _shard_like(value: Any, param: torch.Tensor) -> Any:
    """A full tensor shaped like a DTensor `param` becomes a DTensor with the same mesh and placements."""
    if not (_is_dtensor(param) and torch.is_tensor(value)) or _is_dtensor(value) or value.shape != param.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
