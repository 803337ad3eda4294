"""kill -9 a training run at random moments, resume it, and compare the result bitwise with an uninterrupted run.

A tiny random BERT (MiniLM tokenizer) trains a toy 2-class task for 16 steps with a checkpoint every 2 steps.
Ten trials, seeded: some kill right after a checkpoint's `.step-*.tmp` folder appears (a kill during the write,
including the first one), the rest after a random logged step plus a random delay. Each killed run is continued
with `peftkit train --resume RUN` (when no checkpoint had completed, resume must say so, and the run is started
again in the same folder; a kill that came after the run wrote summary.json found it finished, which --resume
refuses by design: it is compared as it is). Compared with the straight run: every adapter file byte for byte,
summary.json minus timing/memory/path fields, metrics.jsonl minus throughput and training time.

    python benchmarks/kill_resume.py --trials 10 --seed 0 --out benchmarks/results/kill_resume.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOLATILE_SUMMARY = {
    "train_seconds",
    "train_examples_per_s",
    "peak_memory_mb",
    "baseline_memory_mb",
    "peak_memory_above_baseline_mb",
    "run_dir",
    "environment",
}
# timing in metrics.jsonl: the loss records' throughput, the evaluation records' training time so far
VOLATILE_METRICS = {"examples_per_s", "tokens_per_s", "train_seconds"}


def make_env(root: Path) -> Path:
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from peftkit.modeling import resolve_model_path

    model = root / "tiny-bert"
    torch.manual_seed(0)
    AutoModel.from_config(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    ).save_pretrained(model)
    AutoTokenizer.from_pretrained(resolve_model_path("default")).save_pretrained(model)
    task = root / "toy"
    task.mkdir()
    rng = random.Random(0)
    words = (["awful", "terrible", "bad", "boring"], ["great", "wonderful", "excellent", "good"])
    for split, n in (("train", 256), ("validation", 32), ("test", 32)):
        labels = [rng.randrange(2) for _ in range(n)]
        rows = [{"text": f"the film was {rng.choice(words[y])}", "label": y} for y in labels]
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task / "meta.json").write_text(json.dumps({"label_names": ["negative", "positive"]}))
    config = root / "kill.yaml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "recipe": "kill",
                "task": {"name": str(task), "max_length": 32},
                "model": {"name_or_path": str(model)},
                "method": {"name": "lora"},
                "train": {
                    "max_steps": 16,
                    "batch_size": 16,
                    "lr": 0.01,
                    "eval_every": 4,
                    "checkpoint_every": 2,
                    "log_every": 1,
                    "progress": False,
                    "seed": 0,
                },
            }
        )
    )
    return config


def peftkit(*args: str) -> subprocess.Popen:
    # One hash seed for every process, as a precaution: peft keeps target_modules as a set.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "peftkit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


def kill_when(proc: subprocess.Popen, run: Path, mode: str, target: int, delay: float) -> str:
    """Poll until the moment, then SIGKILL. Returns what was happening when the kill landed."""
    checkpoints = run / "checkpoints"
    while proc.poll() is None:
        if mode == "checkpoint":
            try:
                tmp = [
                    e.name for e in os.scandir(checkpoints) if e.name.startswith(".step-") and e.name.endswith(".tmp")
                ]
            except FileNotFoundError:
                tmp = []
            if tmp and int(tmp[0].split(".")[1].split("-")[1]) >= target:
                proc.send_signal(signal.SIGKILL)
                return f"during the write of {tmp[0]}"
            time.sleep(0.0002)
        else:
            if logged_step(run) >= target:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                return f"after step {target} was logged, +{delay * 1000:.0f} ms"
            time.sleep(0.002)
    return "the run finished before the kill"


def continue_killed(run: Path, config: Path) -> tuple[str, str | None]:
    """Bring a killed run to its end: `--resume` it, or start it again in its folder when no checkpoint had
    completed. A kill that landed after the run wrote summary.json found it finished: --resume refuses a finished
    run by design, and the run is compared as it is. Returns what was done, and the last error line if that failed."""
    if (run / "summary.json").is_file():
        return "finished before the kill", None
    proc = peftkit("train", "--resume", str(run))
    _, err = proc.communicate()
    how = "resumed"
    if proc.returncode == 2 and "no checkpoint to resume from" in err:
        how = "restarted (" + err.strip().split("from: ")[-1].split(";")[0] + ")"
        proc = peftkit("train", "--config", str(config), "--run-dir", str(run))
        _, err = proc.communicate()
    if proc.returncode != 0:
        return how, err.strip().splitlines()[-1] if err.strip() else "?"
    notes = [line for line in err.splitlines() if line.startswith("peftkit:")]
    return how + (" (" + "; ".join(notes) + ")" if notes else ""), None


def comparable(run: Path) -> dict:
    adapter = {p.name: p.read_bytes() for p in sorted((run / "adapter").iterdir())}
    summary = {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k not in VOLATILE_SUMMARY}
    metrics = [
        {k: v for k, v in json.loads(line).items() if k not in VOLATILE_METRICS}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    return {"adapter": adapter, "summary": summary, "metrics": metrics}


def differences(got: dict, reference: dict) -> str:
    out = [
        f"adapter/{name}"
        for name in sorted(set(got["adapter"]) | set(reference["adapter"]))
        if got["adapter"].get(name) != reference["adapter"].get(name)
    ]
    out += [
        f"summary.{k}"
        for k in sorted(set(got["summary"]) | set(reference["summary"]))
        if got["summary"].get(k) != reference["summary"].get(k)
    ]
    if len(got["metrics"]) != len(reference["metrics"]):
        out.append(f"metrics.jsonl ({len(got['metrics'])} records against {len(reference['metrics'])})")
    else:
        keys = {
            k
            for a, b in zip(got["metrics"], reference["metrics"])
            for k in a.keys() | b.keys()
            if a.get(k) != b.get(k)
        }
        out += [f"metrics.jsonl {k}" for k in sorted(keys)]
    return ", ".join(out) + " differ"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write a markdown report here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as tmp:
        root = Path(tmp)
        config = make_env(root)
        straight = peftkit("train", "--config", str(config), "--run-dir", str(root / "straight"))
        out, err = straight.communicate()
        if straight.returncode != 0:
            print(err, file=sys.stderr)
            return 1
        reference = comparable(root / "straight")
        control = peftkit("train", "--config", str(config), "--run-dir", str(root / "control"))
        control.communicate()
        same = comparable(root / "control") == reference
        control_note = "yes" if same else "no: " + differences(comparable(root / "control"), reference)
        print(f"control (a second uninterrupted run) matches the first: {control_note}", flush=True)
        rows, matches = [], 0
        for trial in range(args.trials):
            run = root / f"trial-{trial}"
            mode = "checkpoint" if trial % 3 == 0 else "step"  # 4 of 10 during a checkpoint write
            target = rng.choice([2, 2, 4, 8, 12]) if mode == "checkpoint" else rng.randrange(1, 16)
            delay = rng.uniform(0, 0.05)
            proc = peftkit("train", "--config", str(config), "--run-dir", str(run))
            moment = kill_when(proc, run, mode, target, delay)
            proc.wait()
            how, failure = continue_killed(run, config)
            if failure is not None:
                rows.append((trial, moment, f"failed: {failure}", "no"))
                continue
            got = comparable(run)
            ok = got == reference
            matches += ok
            detail = "yes" if ok else "no: " + differences(got, reference)
            rows.append((trial, moment, how, detail))
            print(f"trial {trial}: killed {moment}; {how}; bitwise match: {detail}", flush=True)
    command = "python benchmarks/kill_resume.py " + " ".join(sys.argv[1:])
    print(f"{matches}/{args.trials} killed-and-resumed runs match the uninterrupted run bitwise")
    if args.out:
        lines = [
            "# kill -9 and resume",
            "",
            f"Command: `{command}` (2 shared CPU cores; tiny random BERT, toy task, 16 steps, checkpoint every 2,"
            " evaluation every 4).",
            "",
            "Each run is killed with SIGKILL, continued with `peftkit train --resume RUN`, and compared with an "
            "uninterrupted run: every adapter file byte for byte, summary.json without timing/memory/path fields, "
            "metrics.jsonl without throughput and training time. Every process runs with PYTHONHASHSEED=0 as a "
            "precaution (peft keeps `target_modules` as a set). Earlier attempts found adapter_config.json and "
            "peftkit.json differing (weights, summaries and metrics equal): a fresh run wrote lora_alpha 16, a "
            "resumed one 16.0 (read back from config.yaml); config.py now stores float defaults as floats.",
            "",
            f"**{matches}/{args.trials} match bitwise.** Control (a second uninterrupted run, same command) matches "
            f"the first: {control_note}.",
            "",
            "| trial | killed | then | bitwise match |",
            "| ---: | --- | --- | --- |",
            *[f"| {t} | {m} | {h} | {d} |" for t, m, h, d in rows],
            "",
        ]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines))
    return 0 if matches == args.trials else 1


if __name__ == "__main__":
    raise SystemExit(main())
