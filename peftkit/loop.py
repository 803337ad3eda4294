"""The one training loop every method shares. Read it top to bottom: `train()` is the whole story.

config -> task (tokenised once) -> base model -> method.apply -> AdamW + warmup/linear decay -> steps
(length-bucketed batches, gradient accumulation, clipping, bf16 autocast where it pays, cheap CPU dropout masks,
the method's after-step hook) -> evaluation every N steps, best kept -> run folder (config.yaml, metrics.jsonl,
summary.json, adapter/).
The timed region is the steps only: evaluations and checkpoint saves are left out of train_seconds.

Resumable: with `train.checkpoint_every`, `train(config, resume=run_dir)` continues exactly where it stopped.
Distributed: under `torchrun`, each rank trains on its shard of every batch, with DDP or FSDP2
(`train.distributed`, see distributed.py); rank 0 logs and saves.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.functional import cross_entropy

from peftkit.adapters import MethodContext, apply_method, build_method
from peftkit.adapters.base import Method, is_head_parameter, trainable_state
from peftkit.artifacts import save_adapter
from peftkit.batching import BatchOrder, first_batches
from peftkit.checkpoint import TrainState
from peftkit.config import RunConfig, TrainConfig
from peftkit.console import progress_bar
from peftkit.data import collate, encode, load_task, majority_rate
from peftkit.distributed import Ranks
from peftkit.dropout import attention_keeps_torch_dropout, use_hash_dropout
from peftkit.embedding_grads import EmbeddingGradBuffers
from peftkit.errors import PeftkitError
from peftkit.formats import RunSummary, TaskInfo
from peftkit.guards import DivergenceGuard
from peftkit.inference import evaluate
from peftkit.io import atomic_write_text
from peftkit.local_paths import resolve_local_paths
from peftkit.loggers import MetricsLog, RunLog, check_report_to
from peftkit.measure import MemoryMeter, environment
from peftkit.modeling import (
    check_model_inputs,
    count_parameters,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
    trained_head_modules,
)
from peftkit.precision import autocast, hold_frozen_linears_in_bf16, resolve_bf16
from peftkit.resume import ResumePlan, check_output_dir, new_run_dir, refuse_to_replace_a_run, resume_view

__all__ = ["BatchOrder", "MetricsLog", "Ranks", "build_optimizer", "train"]


def train(config: RunConfig, run_dir: str | Path | None = None, resume: str | Path | None = None) -> RunSummary:
    """Train `config` and return its summary (also written to RUN_DIR/summary.json). Its local paths are made
    absolute first (local_paths.resolve_local_paths): the run then reads the same files from any working folder.
    A config built or edited in code is checked first as a recipe's is (RunConfig.check)."""
    if not isinstance(config, RunConfig):
        raise PeftkitError(f"train() takes a RunConfig (peftkit.load_config builds one), got {type(config).__name__}")
    resolve_local_paths(config.check())
    tcfg = config.train
    ranks = Ranks.from_env(tcfg.distributed)
    device = resolve_device(tcfg.device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
    if tcfg.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PeftkitError("train.bf16=true but this GPU has no bf16 support; set train.bf16=false")
    bf16 = resolve_bf16(tcfg.bf16, device)  # null (the default): on where it pays
    check_report_to(tcfg.report_to)
    ranks.init_process_group(device)
    check_output_dir(tcfg.output_dir, run_dir)
    if run_dir and not resume:
        refuse_to_replace_a_run(Path(run_dir))
    run_dir = Path(resume) if resume else ranks.agree(Path(run_dir) if run_dir else new_run_dir(config))
    plan = ResumePlan(run_dir, config) if resume else None  # refuses a changed config before loading anything

    # Task, tokenised once.
    tokenizer = load_tokenizer(config.model)
    task = load_task(config.task, seed=tcfg.seed)
    if tcfg.metric_for_best == "f1" and task.num_labels != 2:
        raise PeftkitError(
            f"train.metric_for_best=f1 is the binary F1; task {task.name!r} has {task.num_labels} labels, use macro_f1"
        )
    splits = {name: encode(rows, tokenizer, config.task.max_length) for name, rows in task.splits.items()}
    selection = "dev" if "dev" in splits else "validation"  # the split every choice (best step, stopping) reads
    if splits["validation"].labels is None:
        raise PeftkitError(
            f"the validation split of task {task.name!r} has rows without labels; the loop needs them to evaluate"
        )
    lengths = splits["train"].lengths()
    order = BatchOrder(len(splits["train"]), tcfg.batch_size, tcfg.seed, ranks, lengths, tcfg.batching)
    steps_per_epoch = max(1, math.ceil(order.batches_per_epoch / tcfg.grad_accum_steps))
    epochs = tcfg.budget_epochs()
    total_steps = tcfg.max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    eval_every = tcfg.eval_every or (steps_per_epoch if tcfg.patience else None)  # early stopping: every epoch

    # Model and method.
    method = build_method(config.method.name, config.method.options)
    check_method_fits(config, method)
    model = load_model(config.model, task.num_labels, tokenizer.pad_token_id, tcfg.seed, method.frozen_body)
    check_model_inputs(config.task.max_length, model, tokenizer, max(s.largest_token_id() for s in splits.values()))
    heads = trained_head_modules(model)  # classifier, plus the pooler when the model pools with it
    if tcfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    calibration = first_batches(splits["train"], tcfg.batch_size)  # the batches LoRA's eva init reads
    context = MethodContext(resolve_model_path(config.model.name_or_path), heads, total_steps, calibration)
    model = apply_method(method, model, context)
    if not config.model.quantization:
        model.to(device)
    torch_attention = []  # model classes whose attention keeps torch's dropout (reported in the summary)
    if tcfg.dropout_rng == "hash" and device.type == "cpu":
        use_hash_dropout(model)  # the same Bernoulli masks, drawn ~6x cheaper than torch's CPU sampler
        torch_attention = attention_keeps_torch_dropout(model)
    # bf16 copies of the frozen linear weights (the fp32 ones kept aside): autocast need not recast them every step;
    # not under FSDP, which flattens parameters into units of one dtype
    held = bf16 and device.type == "cpu" and method.frozen_linears_in_bf16 and not ranks.sharded
    restore_fp32_linears = hold_frozen_linears_in_bf16(model) if held else (lambda: None)
    # a trained embedding table gets row gradients added into one buffer, not a fresh zeroed table each step; one
    # process on the CPU only (DDP and FSDP reduce dense gradients; CUDA's caching allocator has no such cost)
    one_cpu_process = device.type == "cpu" and ranks.world == 1
    embedding_grads = EmbeddingGradBuffers.keep(model) if one_cpu_process else EmbeddingGradBuffers()
    params = count_parameters(model)
    if params.trainable == 0:
        raise PeftkitError(f"method {method.name!r} left no trainable parameters in this model")
    wrapped = ranks.wrap(model, method.name)  # DDP, or FSDP2 sharding `model` in place (before the optimizer)
    optimizer = build_optimizer(model, tcfg, heads)
    trainable = [p for p in model.parameters() if p.requires_grad]  # what the optimizer and clipping touch
    warmup = int(tcfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (total_steps - s) / max(total_steps - warmup, 1)))
    )

    state, best_weights = TrainState(), None
    checkpoints = run_dir / "checkpoints"
    guard = DivergenceGuard(run_dir)
    if plan:
        latest, state, best_weights = plan.load(model, optimizer, scheduler, ranks)
        guard.checkpoint_written(latest)
        if state.step >= total_steps:
            raise PeftkitError(
                f"{run_dir} is already at step {state.step}, not below this run's {total_steps} steps; "
                "raise train.max_steps to continue"
            )
    log = RunLog(run_dir, enabled=ranks.is_main, truncate_after=state.step if resume else 0, report_to=tcfg.report_to)
    if ranks.is_main:
        atomic_write_text(run_dir / "config.yaml", config.to_yaml())

    def score(split):  # the one evaluation every stage of the run uses
        return evaluate(model, split, task.num_labels, tcfg.eval_batch_size, device, bf16)

    # peft's AdaLoRA adds its orthogonality term to out.loss: only then is the task loss computed apart
    regularised = getattr(method, "regularised", False) or hasattr(
        getattr(model, "base_model", None), "update_and_allocate"
    )

    memory = MemoryMeter(device)
    bar = progress_bar(total_steps, state.step, enabled=tcfg.progress and ranks.is_main, desc=config.recipe or "train")
    model.train()
    started = window_start = time.perf_counter()
    window_examples = window_tokens = 0
    window_steps, window_task_loss, window_total_loss = state.open_window(device)  # summed on the device: no sync
    # a run resumed from the checkpoint of the step early stopping ended it at takes no more steps: it finishes
    stopped_early = tcfg.patience is not None and state.evals_since_best >= tcfg.patience
    metrics = None
    while state.step < total_steps and not stopped_early:
        step_batches = order.step_batches(state, tcfg.grad_accum_steps)  # fewer at an epoch's end
        step_rows = sum(map(len, step_batches))
        for indices in step_batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in collate(splits["train"], indices).items()}
            with autocast(device, bf16):
                out = wrapped(**batch)  # computes the loss once (and a method's regulariser with it)
            loss = out.loss if out.loss is not None else cross_entropy(out.logits.float(), batch["labels"])
            share = len(indices) / step_rows  # every row of the step weighs the same, a partial batch's too
            (loss * share).backward()
            loss = loss.detach() * share
            if regularised:  # the task loss apart from the regulariser, for the log (no graph)
                task_loss = cross_entropy(out.logits.detach().float(), batch["labels"]) * share
            else:
                task_loss = loss
            window_task_loss, window_total_loss = window_task_loss + task_loss, window_total_loss + loss
            state.examples_seen += len(indices) * ranks.world
            window_examples += len(indices) * ranks.world
            window_tokens += sum(lengths[i] for i in indices) * ranks.world
        if device.type == "cpu" or (state.step + 1) % tcfg.log_every == 0:  # on GPUs: no host sync every step
            guard.check_loss(float(window_total_loss), state.step + 1)
        if tcfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, tcfg.max_grad_norm)
        optimizer.step()
        method.after_optimizer_step(model, state.step)  # the one method hook (AdaLoRA reallocates its rank budget)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        embedding_grads.zero()
        state.step += 1
        window_steps += 1

        if state.step % tcfg.log_every == 0 or state.step == total_steps:
            now = time.perf_counter()
            # over all ranks (one collective per log line): each rank summed only its shard's losses
            window_means = ranks.mean(torch.stack([window_task_loss, window_total_loss])) / window_steps
            task_loss, total_loss = window_means.tolist()
            seconds = max(now - window_start, 1e-9)
            record = {
                "step": state.step,
                "epoch": state.epoch,
                "task_loss": round(task_loss, 5),
                "regulariser": round(total_loss - task_loss, 5),
                "lr": scheduler.get_last_lr()[0],
                "examples_per_s": round(window_examples / seconds, 2),
                "tokens_per_s": round(window_tokens / seconds, 1),
            }
            log.write(record)
            bar.set_postfix(loss=f"{task_loss:.4f}", lr=f"{record['lr']:.2e}", ex_s=f"{record['examples_per_s']:.0f}")
            window_start, window_examples, window_tokens, window_steps = time.perf_counter(), 0, 0, 0
            window_task_loss = window_total_loss = torch.zeros((), device=device)
        bar.update(1)
        paused = time.perf_counter()  # evaluation and checkpointing are not training time
        if (eval_every and state.step % eval_every == 0) or state.step == total_steps:
            guard.check_weights(model, state.step)  # never score NaN weights, nor end on them behind an earlier best
            metrics = score(splits[selection])
            seconds_so_far = round(state.train_seconds + paused - started, 2)
            log.write(
                {
                    "step": state.step,
                    "split": selection,
                    "examples_seen": state.examples_seen,
                    "train_seconds": seconds_so_far,
                    **metrics,
                }
            )
            if is_better(metrics[tcfg.metric_for_best], state.best_metric, tcfg.metric_for_best):
                state.best_metric, state.best_step, state.evals_since_best = (
                    metrics[tcfg.metric_for_best],
                    state.step,
                    0,
                )
                if method.restore_best:
                    best_weights = {n: p.detach().clone() for n, p in trainable_state(model).items()}
            else:
                state.evals_since_best += 1
                stopped_early = tcfg.patience is not None and state.evals_since_best >= tcfg.patience
            model.train()
        if tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0 and state.step < total_steps:
            state.train_seconds += paused - started
            started = paused
            guard.check_weights(model, state.step, "checkpoint")
            # kept as the mean over ranks: each rank resumes with it, and the log line's mean stays exact
            state.keep_window(window_steps, *ranks.mean(torch.stack([window_task_loss, window_total_loss])))
            guard.checkpoint_written(
                ranks.save_checkpoint(
                    checkpoints, model, optimizer, scheduler, state, best_weights, config_view=resume_view(config)
                )
            )
        if ranks.world > 1 and tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0:
            dist.barrier()
        excluded = time.perf_counter() - paused
        started, window_start = started + excluded, window_start + excluded
    bar.close()
    state.train_seconds += time.perf_counter() - started
    log.close()
    peak = ranks.peak(memory)

    # Finish: roll back to the best evaluation (unless the method forbids it), score it, ship the adapter.
    if metrics is None:  # resumed at the step early stopping ended the run: its weights, scored again
        metrics = score(splits[selection])
    final_metrics, kept_step, kept_metrics = metrics, state.step, metrics
    if best_weights is not None and state.best_step != state.step:
        ranks.load_weights(model, best_weights)
        kept_step = state.best_step
        kept_metrics = score(splits[selection])
    validation_metrics = score(splits["validation"]) if selection == "dev" else None  # never selected on
    test_metrics = None
    if "test" in splits and splits["test"].labels is not None:
        test_metrics = score(splits["test"])
    summary = RunSummary(
        recipe=config.recipe,
        task=task.name,
        method=method.name,
        model=config.model.name_or_path,
        seed=tcfg.seed,
        steps=state.step,
        examples_seen=state.examples_seen,
        train_examples=len(splits["train"]),
        validation_examples=len(splits["validation"]),
        final=final_metrics,
        best={"step": kept_step, **kept_metrics},
        test=test_metrics,
        validation=validation_metrics,
        selection_split=selection,
        stopped_early=stopped_early,
        majority_rate=majority_rate(splits["train"].labels, splits["validation"].labels),
        kept="best" if method.restore_best else "final",
        trainable_params=params.trainable,
        total_params=params.total,
        trainable_pct=round(params.trainable_pct, 4),
        train_seconds=round(state.train_seconds, 2),
        train_examples_per_s=round(state.examples_seen / max(state.train_seconds, 1e-9), 2),
        **peak,
        model_state_mb=ranks.model_state_mb(model),
        device=str(device),
        bf16=bf16,
        world_size=ranks.world,
        environment=environment(),
        run_dir=str(run_dir),
    )
    if torch_attention:  # its code checks the attention implementation's name: hash masks would break its masking
        summary.extra["attention_dropout_rng"] = f"torch ({', '.join(torch_attention)} keeps its own sdpa path)"
    if task.skipped_rows:
        summary.extra["skipped_rows"] = len(task.skipped_rows)
        summary.extra["skipped_rows_first"] = task.skipped_rows[:10]
    restore_fp32_linears()  # the model leaves train() as it was loaded
    embedding_grads.release()
    saved = ranks.full_model(
        model,
        lambda: method.apply(  # under FSDP: an unsharded copy with the gathered weights
            load_model(config.model, task.num_labels, tokenizer.pad_token_id, tcfg.seed, method.frozen_body),
            MethodContext(resolve_model_path(config.model.name_or_path), heads, total_steps),
        ),
    )
    if ranks.is_main:
        guard.check_weights(model, state.step)
        task_info = TaskInfo(
            name=task.name,
            label_names=task.label_names,
            is_pair=task.is_pair,
            metrics=list(task.metrics),
            text_field=config.task.text_field,
            text_pair_field=config.task.text_pair_field,
            max_length=config.task.max_length,
        )
        meta = save_adapter(
            saved,
            method,
            run_dir / "adapter",
            base_model=config.model.name_or_path,
            task=task_info,
            metrics={"validation": validation_metrics or kept_metrics, "test": test_metrics},
            params=params,
            head_modules=heads,
            base_quantization=config.model.quantization,
        )
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
    params = [p for ps in groups.values() for p in ps]
    return torch.optim.AdamW(
        [
            {"params": ps, "lr": head_lr if head else tcfg.lr, "weight_decay": tcfg.weight_decay if decay else 0.0}
            for (head, decay), ps in sorted(groups.items())
        ],
        fused=can_fuse(params) or None,  # one kernel for all tensors instead of a Python loop over them
    )


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Fused AdamW needs plain floating tensors on CPU or CUDA (not FSDP's DTensors)."""
    from torch.distributed.tensor import DTensor

    return all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for p in params
    )


def check_method_fits(config: RunConfig, method: Method) -> None:
    """Settings the method cannot honour, refused before anything loads (and by `peftkit train --dry-run`)."""
    if config.model.quantization and method.quantization_error():
        raise PeftkitError(method.quantization_error())
    if config.train.checkpoint_every and not method.resumable:
        raise PeftkitError(
            f"method {method.name!r} cannot be checkpointed for an exact resume ({method.resume_blocker}); "
            "unset train.checkpoint_every"
        )


def is_better(value: float, best: float | None, metric: str) -> bool:
    return best is None or (value < best if metric == "loss" else value > best)
