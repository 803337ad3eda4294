"""peftkit's loop against `transformers.Trainer` + peft, side by side on this machine (issue 8).

    python benchmarks/speed.py --train-rows 1000 --repeats 2 --out benchmarks/results/speed

For each (task, method) it trains, in fresh processes and alternating (A B C D, then D C B A, ...):
  trainer-default  Trainer + peft as PEFT's docs write it (DataCollatorWithPadding), batch 32, max length 128, fp32
  trainer-best     the same with group_by_length (transformers 5: train_sampling_strategy), and bf16=True where
                   bf16 pays (AMX / AVX512-BF16; on an AVX2-only CPU bf16 is emulated and slower, so fp32 there)
  peftkit-default  `peftkit train <task>-<method>` with its recipe's defaults (bucketed batches, bf16 where it pays)
  peftkit-matched  peftkit at the Trainer's settings: batch 32, max length 128, fp32, random batches
  peftkit-ckpt     peftkit defaults + train.gradient_checkpointing (LoRA on the first task only)
All runs: the same seeded subsample of training rows, one epoch, the same learning rates, evaluation on the full
validation split after training (not timed). Then the roofline part (matmul peak fp32/bf16 and the LoRA step's
FLOPs) and `peftkit predict` wall time on the SST-2 validation set 8 times over. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speed_parts import LORA, bf16_pays_here, lora_step_flops_per_token, matmul_peak, time_predict

VARIANTS = ("trainer-default", "trainer-best", "peftkit-default", "peftkit-matched")


# --------------------------------------------------------------------------------------------- one run (child)


def rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rows_and_config(task: str, method: str, train_rows: int, overrides: list[str], eval_rows: int | None = None):
    from peftkit.data import load_task
    from peftkit.recipe_files import load_config

    config = load_config(
        recipe=f"{task}-{method}",
        overrides=[
            f"task.max_train_examples={train_rows}",
            "train.epochs=1",
            "train.max_steps=null",
            "train.max_epochs=null",  # one pass like the Trainer's: no early stopping or dev split (the converged
            "train.patience=null",  # recipes carry both; they do not change the speed of a step)
            "task.dev_size=null",
            "train.eval_every=null",
            "train.checkpoint_every=null",
            "train.progress=false",
            "train.log_every=1000000",
            f"task.max_eval_examples={eval_rows or 'null'}",
            *overrides,
        ],
    )
    return load_task(config.task, seed=config.train.seed), config


def run_peftkit(
    task: str, method: str, train_rows: int, overrides: list[str], keep: str | None, eval_rows: int | None
) -> dict:
    from peftkit.data import encode
    from peftkit.loop import train
    from peftkit.modeling import load_tokenizer

    data, config = rows_and_config(task, method, train_rows, overrides, eval_rows)
    lengths = encode(data.splits["train"], load_tokenizer(config.model), config.task.max_length).lengths()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(keep) if keep else Path(tmp) / "run"
        summary = train(config, run_dir=run_dir)
    return {
        "examples_per_s": summary.train_examples_per_s,
        "train_seconds": summary.train_seconds,
        "tokens_per_s": sum(lengths) / summary.train_seconds,
        "peak_memory_mb": summary.peak_memory_mb,
        "accuracy": summary.final["accuracy"],
        "bf16": summary.bf16,
        "batch_size": config.train.batch_size,
        "max_length": config.task.max_length,
        "batching": config.train.batching,
        "real_tokens": sum(lengths),
        "examples": summary.examples_seen,
    }


def run_trainer(task: str, method: str, train_rows: int, best: bool, eval_rows: int | None) -> dict:
    """Trainer + peft the way PEFT's sequence-classification docs write it."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from peftkit.modeling import resolve_model_path

    data, config = rows_and_config(task, method, train_rows, [], eval_rows)
    path = resolve_model_path("default")
    tokenizer = AutoTokenizer.from_pretrained(path)

    def tokenize(rows):
        pairs = [r["text_pair"] for r in rows] if data.is_pair else None
        enc = tokenizer([r["text"] for r in rows], pairs, truncation=True, max_length=128)
        return [{**{k: enc[k][i] for k in enc}, "labels": r["label"]} for i, r in enumerate(rows)]

    train_set, validation = tokenize(data.splits["train"]), tokenize(data.splits["validation"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=data.num_labels)
    if method == "lora":
        peft_config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
        )
        model = get_peft_model(model, peft_config)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=64,
            num_train_epochs=1,
            learning_rate=config.train.lr,
            weight_decay=config.train.weight_decay,
            warmup_steps=int(config.train.warmup_ratio * -(-len(train_set) // 32)),
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            seed=0,
            use_cpu=True,
            disable_tqdm=True,
            bf16=best and bf16_pays_here(),
            train_sampling_strategy="group_by_length" if best else "random",
        )
        collator = DataCollatorWithPadding(tokenizer)
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator)
        rss_reset()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        peak = rss_peak_mb()
        logits = trainer.predict(validation).predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    accuracy = float((logits.argmax(-1) == [r["labels"] for r in validation]).mean())
    real = sum(len(r["input_ids"]) for r in train_set)
    return {
        "examples_per_s": len(train_set) / seconds,
        "train_seconds": seconds,
        "tokens_per_s": real / seconds,
        "peak_memory_mb": peak,
        "accuracy": accuracy,
        "bf16": best and bf16_pays_here(),
        "batch_size": 32,
        "max_length": 128,
        "batching": "group_by_length" if best else "random",
        "real_tokens": real,
        "examples": len(train_set),
    }


def child(spec: dict) -> dict:
    variant, task, method, rows = spec["variant"], spec["task"], spec["method"], spec["train_rows"]
    if variant.startswith("trainer"):
        return run_trainer(task, method, rows, variant == "trainer-best", spec.get("eval_rows"))
    overrides = {
        "peftkit-default": [],
        "peftkit-matched": ["task.max_length=128", "train.batch_size=32", "train.bf16=false", "train.batching=random"],
        "peftkit-ckpt": ["train.gradient_checkpointing=true"],
    }[variant]
    return run_peftkit(task, method, rows, overrides, spec.get("keep"), spec.get("eval_rows"))


# --------------------------------------------------------------------------------------------- parent


def spawn(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr[-1500:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default="sst2,mrpc")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--full-tasks", default="sst2", help="tasks that also run full fine-tuning")
    parser.add_argument("--full-variants", default=",".join(VARIANTS), help="variants run for full fine-tuning")
    parser.add_argument("--eval-rows", type=int, default=None, help="a seeded sample of validation rows")
    parser.add_argument("--predict-repeats", type=int, default=1)
    parser.add_argument("--once", default="", help="runs made in the first repeat only (comma-separated)")
    parser.add_argument("--skip", default="", help="runs to leave out, e.g. mrpc-lora-trainer-best (comma-separated)")
    parser.add_argument("--out", default="benchmarks/results/speed")
    parser.add_argument("--from-log", help="rebuild the report from the JSON lines an interrupted run printed")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        print(json.dumps(child(json.loads(args.child))))
        return

    tasks, methods = args.tasks.split(","), args.methods.split(",")
    cells = [(t, m) for t in tasks for m in methods if m != "full" or t in args.full_tasks.split(",")]
    work = Path(tempfile.mkdtemp(prefix="peftkit-speed-"))
    runs: list[dict] = []
    if args.from_log:
        lines = Path(args.from_log).read_text().splitlines()
        runs = [json.loads(line) for line in lines if line.startswith('{"variant"')]
    started = time.perf_counter()
    for repeat in range(0 if args.from_log else args.repeats):
        for task, method in cells:
            variants = list(VARIANTS) if method != "full" else args.full_variants.split(",")
            variants += ["peftkit-ckpt"] if (task, method) == cells[0] else []
            variants = [
                v
                for v in variants
                if f"{task}-{method}-{v}" not in args.skip.split(",")
                and (repeat == 0 or f"{task}-{method}-{v}" not in args.once.split(","))
            ]
            for variant in variants if repeat % 2 == 0 else variants[::-1]:  # alternate the order
                spec = {
                    "variant": variant,
                    "task": task,
                    "method": method,
                    "train_rows": args.train_rows,
                    "eval_rows": args.eval_rows,
                }
                if (task, method, variant, repeat) == (cells[0][0], "lora", "peftkit-default", 0):
                    spec["keep"] = str(work / "adapter-run")
                result = {**spec, "repeat": repeat, **spawn(spec)}
                runs.append(result)
                print(json.dumps(result), flush=True)
    adapter = work / "adapter-run" / "adapter"
    predict = time_predict(adapter, work, args.predict_repeats) if adapter.exists() else None

    import torch

    # bf16's peak only where bf16 pays: emulated on an AVX2 CPU it takes minutes and no step uses it
    peak = {d: matmul_peak(d) for d in ("float32", "bfloat16") if d == "float32" or bf16_pays_here()}
    report = summarise(runs, cells, peak, predict)
    report.update(
        {
            "command": "python " + " ".join(sys.argv),
            "wall_seconds": round(time.perf_counter() - started),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "matmul_peak_flops": peak,
        }
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**report, "runs": runs}, indent=1))
    out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))


def summarise(runs: list[dict], cells, peak: dict, predict: dict | None) -> dict:
    table = []
    for task, method in cells:
        row = {"task": task, "method": method}
        for variant in (*VARIANTS, "peftkit-ckpt"):
            done = [
                r
                for r in runs
                if (r["task"], r["method"], r["variant"]) == (task, method, variant) and "error" not in r
            ]
            if done:
                row[variant] = {
                    k: median([r[k] for r in done])
                    for k in ("examples_per_s", "tokens_per_s", "peak_memory_mb", "accuracy", "train_seconds")
                }
                row[variant]["each_examples_per_s"] = [round(r["examples_per_s"], 1) for r in done]
                row[variant]["bf16"] = done[0]["bf16"]
                row[variant]["mean_length"] = done[0]["real_tokens"] / done[0]["examples"]
        ex = {v: row[v]["examples_per_s"] for v in VARIANTS if v in row}
        pairs = {
            "defaults_vs_trainer_defaults": ("peftkit-default", "trainer-default"),
            "defaults_vs_trainer_best": ("peftkit-default", "trainer-best"),
            "matched_fp32_vs_trainer_defaults": ("peftkit-matched", "trainer-default"),
        }
        row["ratios"] = {k: ex[a] / ex[b] for k, (a, b) in pairs.items() if a in ex and b in ex}
        table.append(row)
    roofline = None
    first = table[0] if table else {}
    if first.get("method") == "lora" and "peftkit-default" in first:
        d = first["peftkit-default"]
        flops = lora_step_flops_per_token(d["mean_length"])
        achieved = d["tokens_per_s"] * flops["step"]
        roofline = {
            "flops_per_token": flops,
            "achieved_flops": achieved,
            "bf16" if d["bf16"] else "fp32": True,
            "fraction_of_peak": achieved / peak["bfloat16" if d["bf16"] else "float32"],
        }
    return {"table": table, "roofline": roofline, "predict": predict}


def to_markdown(report: dict) -> str:
    lines = [
        "# peftkit vs transformers.Trainer + peft: training speed on this machine",
        "",
        f"Command: `{report.get('command')}` ({report.get('wall_seconds')} s). "
        f"Machine: {report.get('cpu_count')} cores, torch threads {report.get('torch_threads')}, "
        f"load average at the end {report.get('load_average')}"
        + (
            " (the machine was shared with other jobs: treat ratios as rough)."
            if max(report.get("load_average") or [0]) > 2.5
            else " (quiet)."
        ),
        "",
        "| task | method | setting | ex/s (median; each run) | tokens/s | peak RSS MB | val acc | bf16 |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for row in report["table"]:
        for variant in (*VARIANTS, "peftkit-ckpt"):
            if variant in row:
                v = row[variant]
                lines.append(
                    f"| {row['task']} | {row['method']} | {variant} | {v['examples_per_s']:.1f} "
                    f"({', '.join(map(str, v['each_examples_per_s']))}) | {v['tokens_per_s']:.0f} | "
                    f"{v['peak_memory_mb']:.0f} | {v['accuracy']:.4f} | {v['bf16']} |"
                )
    lines += [
        "",
        "| task | method | peftkit defaults / Trainer defaults (target >= 2.5x) | "
        "peftkit defaults / Trainer best (>= 1.3x) | peftkit matched fp32 / Trainer defaults (>= 1.0x) |",
        "|---|---|---:|---:|---:|",
    ]
    for row in report["table"]:
        r = row["ratios"]
        shown = [
            f"{r[k]:.2f}x" if k in r else "–"
            for k in ("defaults_vs_trainer_defaults", "defaults_vs_trainer_best", "matched_fp32_vs_trainer_defaults")
        ]
        lines.append(f"| {row['task']} | {row['method']} | {' | '.join(shown)} |")
    if report.get("roofline"):
        rf = report["roofline"]
        peak = report.get("matmul_peak_flops", {})
        lines += [
            "",
            f"Roofline: matmul peak fp32 {peak.get('float32', 0) / 1e9:.1f} GFLOP/s, bf16 "
            + (f"{peak['bfloat16'] / 1e9:.1f} GFLOP/s" if "bfloat16" in peak else "not measured (does not pay here)")
            + f"; LoRA step {rf['flops_per_token']['step'] / 1e6:.1f} "
            f"MFLOP per real token; achieved {rf['achieved_flops'] / 1e9:.1f} GFLOP/s = "
            f"{rf['fraction_of_peak']:.0%} of the peak of the precision used.",
        ]
    if report.get("predict"):
        p = report["predict"]
        lines += [
            "",
            f"`peftkit predict` on {p['rows']} rows (SST-2 validation x8), wall time incl. start-up: "
            f"defaults {p['default']} s"
            + (
                f", --no-bf16 {p['no_bf16']} s."
                if p["no_bf16"]
                else " (bf16 does not pay on this CPU, so the defaults are fp32)."
            ),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
