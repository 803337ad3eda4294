"""The one training loop every method shares. Read it top to bottom: `train()` is the whole story.

config -> task (tokenised once) -> base model -> method.apply -> AdamW + warmup/linear decay -> steps
(gradient accumulation, clipping, optional bf16 autocast, the method's after-step hook) -> evaluation every N
steps, best kept -> run folder (config.yaml, metrics.jsonl, summary.json, adapter/).

Resumable: with `train.checkpoint_every`, `train(config, resume=run_dir)` continues exactly where it stopped.
Distributed: under `torchrun`, each rank trains on its shard of every batch (DDP); rank 0 logs and saves.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftkit.adapters import MethodContext, build_method
from peftkit.adapters.base import is_head_parameter, trainable_state
from peftkit.artifacts import save_adapter
from peftkit.checkpoint import TrainState, save_checkpoint
from peftkit.config import RunConfig, TrainConfig
from peftkit.console import progress_bar
from peftkit.data import collate, encode, load_task
from peftkit.errors import PeftkitError
from peftkit.formats import RunSummary, TaskInfo
from peftkit.guards import DivergenceGuard
from peftkit.inference import autocast, evaluate
from peftkit.io import atomic_write_text
from peftkit.measure import MemoryMeter, environment, model_state_mb
from peftkit.modeling import (
    count_parameters,
    head_modules,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
)
from peftkit.resume import ResumePlan, resume_view
from peftkit.validation import apply_method, check_max_length, check_output_dir


def train(config: RunConfig, run_dir: str | Path | None = None, resume: str | Path | None = None) -> RunSummary:
    """Train `config` and return its summary (also written to RUN_DIR/summary.json)."""
    tcfg = config.train
    ranks = Ranks.from_env()
    device = resolve_device(tcfg.device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
    if tcfg.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PeftkitError("train.bf16=true but this GPU has no bf16 support; set train.bf16=false")
    ranks.init_process_group(device)
    check_output_dir(tcfg.output_dir, run_dir)
    run_dir = Path(resume) if resume else ranks.agree(Path(run_dir) if run_dir else new_run_dir(config))
    plan = ResumePlan(run_dir, config) if resume else None  # refuses a changed config before loading anything

    # Task, tokenised once.
    tokenizer = load_tokenizer(config.model)
    task = load_task(config.task, seed=tcfg.seed)
    if tcfg.metric_for_best == "f1" and task.num_labels != 2:
        raise PeftkitError(f"train.metric_for_best=f1 is the binary F1; task {task.name!r} has {task.num_labels} labels, use macro_f1")
    splits = {name: encode(rows, tokenizer, config.task.max_length) for name, rows in task.splits.items()}
    if splits["validation"].labels is None:
        raise PeftkitError(f"the validation split of task {task.name!r} has rows without labels; the loop needs them to evaluate")
    order = BatchOrder(len(splits["train"]), tcfg.batch_size, tcfg.seed, ranks)
    steps_per_epoch = max(1, math.ceil(order.batches_per_epoch / tcfg.grad_accum_steps))
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * steps_per_epoch))

    # Model and method.
    method = build_method(config.method.name, config.method.options)
    model = load_model(config.model, task.num_labels, tokenizer.pad_token_id, seed=tcfg.seed)
    check_max_length(config.task.max_length, model, tokenizer)
    heads = head_modules(model)
    if tcfg.checkpoint_every and not method.resumable:
        raise PeftkitError(f"method {method.name!r} cannot be checkpointed for an exact resume ({method.resume_blocker}); unset train.checkpoint_every")
    context = MethodContext(resolve_model_path(config.model.name_or_path), heads, total_steps)
    model = apply_method(method, model, context)
    if not config.model.quantization:
        model.to(device)
    params = count_parameters(model)
    if params.trainable == 0:
        raise PeftkitError(f"method {method.name!r} left no trainable parameters in this model")
    optimizer = build_optimizer(model, tcfg, heads)
    trainable = [p for p in model.parameters() if p.requires_grad]  # what the optimizer and clipping touch
    warmup = int(tcfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (total_steps - s) / max(total_steps - warmup, 1))))

    state, best_weights = TrainState(), None
    checkpoints = run_dir / "checkpoints"
    guard = DivergenceGuard(run_dir)
    if plan:
        latest, state, best_weights = plan.load(model, optimizer, scheduler)
        guard.checkpoint_written(latest)
        if state.step >= total_steps:
            raise PeftkitError(f"{run_dir} is already at step {state.step}, not below this run's {total_steps} steps; raise train.max_steps to continue")
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=ranks.is_main, truncate_after=state.step if resume else 0)
    if ranks.is_main:
        atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    wrapped = nn.parallel.DistributedDataParallel(model) if ranks.world > 1 else model

    def score(split):  # the one evaluation every stage of the run uses
        return evaluate(model, split, task.num_labels, tcfg.eval_batch_size, tokenizer.pad_token_id, device, tcfg.bf16)

    memory = MemoryMeter(device)
    bar = progress_bar(total_steps, state.step, enabled=tcfg.progress and ranks.is_main, desc=config.recipe or "train")
    model.train()
    started, window_start, window_examples = time.perf_counter(), time.perf_counter(), 0
    window_task_loss = window_total_loss = 0.0  # summed over the optimizer steps since the last log line
    window_steps = 0
    while state.step < total_steps:
        task_loss_sum = total_loss_sum = 0.0
        for _ in range(tcfg.grad_accum_steps):
            batch = {k: v.to(device) for k, v in collate(splits["train"], order.next(state), tokenizer.pad_token_id).items()}
            with autocast(device, tcfg.bf16):
                out = wrapped(**batch)
            task_loss = nn.functional.cross_entropy(out.logits.float(), batch["labels"])
            loss = out.loss if out.loss is not None else task_loss  # includes a method's regulariser (AdaLoRA)
            (loss / tcfg.grad_accum_steps).backward()
            task_loss_sum += task_loss.item() / tcfg.grad_accum_steps
            total_loss_sum += loss.item() / tcfg.grad_accum_steps
            state.examples_seen += len(batch["labels"]) * ranks.world
            window_examples += len(batch["labels"]) * ranks.world
        guard.check_loss(total_loss_sum, state.step + 1)
        if tcfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, tcfg.max_grad_norm)
        optimizer.step()
        method.after_optimizer_step(model, state.step)  # the one method hook (AdaLoRA reallocates its rank budget)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        window_task_loss, window_total_loss = window_task_loss + task_loss_sum, window_total_loss + total_loss_sum
        window_steps += 1

        if state.step % tcfg.log_every == 0 or state.step == total_steps:
            now = time.perf_counter()
            task_loss = window_task_loss / window_steps
            record = {"step": state.step, "epoch": state.epoch, "task_loss": round(task_loss, 5),
                      "regulariser": round((window_total_loss - window_task_loss) / window_steps, 5),
                      "lr": scheduler.get_last_lr()[0],
                      "examples_per_s": round(window_examples / max(now - window_start, 1e-9), 2)}
            log.write(record)
            bar.set_postfix(loss=f"{task_loss:.4f}", lr=f"{record['lr']:.2e}", ex_s=f"{record['examples_per_s']:.0f}")
            window_start, window_examples, window_task_loss, window_total_loss, window_steps = now, 0, 0.0, 0.0, 0
        bar.update(1)
        if (tcfg.eval_every and state.step % tcfg.eval_every == 0) or state.step == total_steps:
            metrics = score(splits["validation"])
            log.write({"step": state.step, "split": "validation", **metrics})
            if is_better(metrics[tcfg.metric_for_best], state.best_metric, tcfg.metric_for_best):
                state.best_metric, state.best_step = metrics[tcfg.metric_for_best], state.step
                if method.restore_best:
                    best_weights = {n: p.detach().clone() for n, p in trainable_state(model).items()}
            model.train()
        if tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0 and state.step < total_steps and ranks.is_main:
            state.train_seconds += time.perf_counter() - started
            started = time.perf_counter()
            guard.check_weights(model, state.step, "checkpoint")
            guard.checkpoint_written(save_checkpoint(checkpoints, model, optimizer, scheduler, state, best_weights,
                                                     config_view=resume_view(config)))
        if ranks.world > 1 and tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0:
            dist.barrier()
    bar.close()
    state.train_seconds += time.perf_counter() - started
    peak = memory.peak()

    # Finish: roll back to the best evaluation (unless the method forbids it), score it, ship the adapter.
    final_metrics, kept_step, kept_metrics = metrics, state.step, metrics
    if best_weights is not None and state.best_step != state.step:
        model.load_state_dict(best_weights, strict=False)
        kept_step = state.best_step
        kept_metrics = score(splits["validation"])
    test_metrics = None
    if "test" in splits and splits["test"].labels is not None:
        test_metrics = score(splits["test"])
    summary = RunSummary(
        recipe=config.recipe, task=task.name, method=method.name, model=config.model.name_or_path,
        seed=tcfg.seed, steps=state.step, examples_seen=state.examples_seen,
        train_examples=len(splits["train"]), validation_examples=len(splits["validation"]),
        final=final_metrics, best={"step": kept_step, **kept_metrics}, test=test_metrics,
        kept="best" if method.restore_best else "final",
        trainable_params=params.trainable, total_params=params.total, trainable_pct=round(params.trainable_pct, 4),
        train_seconds=round(state.train_seconds, 2),
        train_examples_per_s=round(state.examples_seen / max(state.train_seconds, 1e-9), 2),
        **peak, model_state_mb=model_state_mb(model),
        device=str(device), bf16=tcfg.bf16, world_size=ranks.world, environment=environment(), run_dir=str(run_dir),
    )
    if task.skipped_rows:
        summary.extra["skipped_rows"] = len(task.skipped_rows)
        summary.extra["skipped_rows_first"] = task.skipped_rows[:10]
    if ranks.is_main:
        guard.check_weights(model, state.step)
        task_info = TaskInfo(name=task.name, label_names=task.label_names, is_pair=task.is_pair, metrics=list(task.metrics),
                             text_field=config.task.text_field, text_pair_field=config.task.text_pair_field,
                             max_length=config.task.max_length)
        meta = save_adapter(model, method, run_dir / "adapter", base_model=config.model.name_or_path, task=task_info,
                            metrics={"validation": kept_metrics, "test": test_metrics}, params=params)
        summary.adapter_bytes = meta.adapter_bytes
        summary.write(run_dir)
    ranks.finish()
    return summary


# --------------------------------------------------------------------------------------------- pieces of the loop


def build_optimizer(model: nn.Module, tcfg: TrainConfig, heads: list[str]) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms; the head may get its own learning rate."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = p.ndim >= 2 and "norm" not in name.lower()
            groups.setdefault((is_head_parameter(name, heads), decay), []).append(p)
    head_lr = tcfg.head_lr or tcfg.lr
    return torch.optim.AdamW([
        {"params": ps, "lr": head_lr if head else tcfg.lr, "weight_decay": tcfg.weight_decay if decay else 0.0}
        for (head, decay), ps in sorted(groups.items())
    ])


class BatchOrder:
    """A deterministic, resumable data order: epoch e is a permutation seeded by (seed, e).

    Each global batch holds batch_size rows per rank; rank r takes its own slice, so ranks never overlap.
    The position (epoch, batch_in_epoch) lives in TrainState, so a resumed run continues with the next batch.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, ranks: Ranks):
        if num_rows == 0:
            raise PeftkitError("the train split is empty")
        self.num_rows, self.batch_size, self.seed, self.ranks = num_rows, batch_size, seed, ranks
        global_batch = batch_size * ranks.world
        # one process keeps the last partial batch; several drop it so every rank steps together
        self.batches_per_epoch = math.ceil(num_rows / global_batch) if ranks.world == 1 else max(1, num_rows // global_batch)
        self._epoch, self._perm = None, None

    def next(self, state: TrainState) -> list[int]:
        if state.batch_in_epoch >= self.batches_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if self._epoch != state.epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + state.epoch)
            self._perm, self._epoch = torch.randperm(self.num_rows, generator=generator).tolist(), state.epoch
        start = (state.batch_in_epoch * self.ranks.world + self.ranks.rank) * self.batch_size
        state.batch_in_epoch += 1
        indices = self._perm[start:start + self.batch_size]
        return indices or self._perm[:self.batch_size]


def is_better(value: float, best: float | None, metric: str) -> bool:
    return best is None or (value < best if metric == "loss" else value > best)


class MetricsLog:
    """metrics.jsonl: one JSON object per line (train records and evaluations)."""

    def __init__(self, path: Path, enabled: bool, truncate_after: int = 0):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if truncate_after and path.exists():  # resuming: drop records past the checkpoint
                kept = [line for line in path.read_text().splitlines() if _step_of(line) <= truncate_after]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _step_of(line: str) -> float:
    """Step of a metrics.jsonl line; a half-written last line (process killed mid-append) counts as past the end."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def new_run_dir(config: RunConfig) -> Path:
    name = config.train.run_name or f"{config.recipe or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(config.train.output_dir) / name
    suffix = 1
    while path.exists():
        path, suffix = Path(config.train.output_dir) / f"{name}-{suffix}", suffix + 1
    return path


@dataclass
class Ranks:
    """Where this process stands under torchrun (WORLD_SIZE/RANK/LOCAL_RANK); one process otherwise."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init_process_group(self, device: torch.device) -> None:
        if self.world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)  # NCCL (and broadcast_object_list) use the current device
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def agree(self, path: Path) -> Path:
        """Every rank must write to rank 0's run folder (names carry a timestamp)."""
        if self.world == 1:
            return path
        holder = [str(path)]
        dist.broadcast_object_list(holder, src=0)
        return Path(holder[0])

    def finish(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
