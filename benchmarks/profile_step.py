"""Profile training steps of LoRA on SST-2 (MiniLM, r=8 q/v, batch 32) with torch.profiler: where the time goes.

    python benchmarks/profile_step.py before after
    before: the loop as it was: random batches, fp32, the loss computed twice, two .item() host syncs per step
    after:  the loop now: length-bucketed batches, bf16 autocast only where it pays (`peftkit.precision`; fp32 on
            a CPU without AMX / AVX512-BF16), the model's loss once, no per-step sync, hash dropout masks
            (`train.dropout_rng: hash`, peftkit/dropout.py)
    after-torch-dropout: as after, with torch's own dropout masks (`train.dropout_rng: torch`)
    after-bf16: as after, with bf16 autocast forced on
    after-cast: as after with bf16, but the frozen linear weights left in fp32 for autocast to recast every step
                (the loop holds them in bf16 under bf16 autocast: `precision.hold_frozen_linears_in_bf16`)

Both draw the same 2,000 training rows; 3 warm-up steps, then 10 profiled steps. Prints the top operators.
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from peftkit.adapters import MethodContext, build_method
from peftkit.config import ModelConfig, TaskConfig
from peftkit.data import collate, encode, load_task
from peftkit.dropout import use_hash_dropout
from peftkit.modeling import head_modules, load_model, load_tokenizer, resolve_model_path

MODES = ("before", "after", "after-torch-dropout", "after-bf16", "after-cast")
BATCH_SIZE, WARMUP_STEPS, PROFILED_STEPS = 32, 3, 10


def batches(split, mode: str, batch_size: int, n: int) -> list[list[int]]:
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(0)).tolist()
    if mode.startswith("after"):  # one chunk of 50 batches sorted by length, as train.batching=bucketed does
        chunk = sorted(perm[: batch_size * 50], key=lambda i: len(split.features["input_ids"][i]))
        groups = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(1)).tolist()
        return [groups[i] for i in order][:n]
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(n)]


def main(mode: str = "before") -> None:
    torch.manual_seed(0)
    model_cfg = ModelConfig()
    tokenizer = load_tokenizer(model_cfg)
    task = load_task(TaskConfig(name="sst2", max_length=64, max_train_examples=2000))
    split = encode(task.splits["train"], tokenizer, 64)
    model = load_model(model_cfg, 2, tokenizer.pad_token_id)
    model = build_method("lora").apply(model, MethodContext(resolve_model_path("default"), head_modules(model), 100))
    if mode in ("after", "after-bf16", "after-cast"):
        use_hash_dropout(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    from peftkit.precision import hold_frozen_linears_in_bf16, resolve_bf16

    where_it_pays = mode in ("after", "after-torch-dropout") and resolve_bf16(None, torch.device("cpu"))
    bf16 = mode in ("after-bf16", "after-cast") or where_it_pays
    if bf16 and mode != "after-cast":
        hold_frozen_linears_in_bf16(model)
    takes_pad = "pad_token_id" in inspect.signature(collate).parameters

    def step(indices):
        batch = collate(split, indices, tokenizer.pad_token_id) if takes_pad else collate(split, indices)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        if mode == "before":
            task_loss = nn.functional.cross_entropy(out.logits.float(), batch["labels"])
            loss = out.loss if out.loss is not None else task_loss
            loss.backward()
            task_loss.item(), loss.item()
        else:
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum()), batch["input_ids"].numel()

    plan = batches(split, mode, BATCH_SIZE, WARMUP_STEPS + PROFILED_STEPS)
    for indices in plan[:WARMUP_STEPS]:
        step(indices)
    real = padded = examples = 0
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        started = time.perf_counter()
        for indices in plan[WARMUP_STEPS:]:
            r, p = step(indices)
            real, padded, examples = real + r, padded + p, examples + len(indices)
        seconds = time.perf_counter() - started
    print(
        f"mode={mode} (bf16 {bf16}): {seconds / PROFILED_STEPS * 1000:.0f} ms/step, {examples / seconds:.1f} ex/s, "
        f"real tokens {real / padded:.0%} of {padded} in the batches"
    )
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))
    products = [e for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    product_seconds = sum(e.self_cpu_time_total for e in products) / 1e6
    share = product_seconds / (sum(e.self_cpu_time_total for e in events) / 1e6)
    print(
        f"matrix products (mm, addmm, bmm): {share:.0%} of the operators' self time, at "
        f"{sum(e.flops for e in products) / product_seconds / 1e9:.0f} GFLOP/s on these shapes"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modes", nargs="*", metavar="MODE", help=f"{', '.join(MODES)} (default: before after)")
    modes = parser.parse_args().modes or ["before", "after"]
    if unknown := [m for m in modes if m not in MODES]:  # argparse's choices reject an empty nargs="*" on 3.11
        parser.error(f"unknown mode {', '.join(unknown)}; choose from {', '.join(MODES)}")
    for name in modes:
        main(name)
