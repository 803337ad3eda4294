"""Serving benchmark (a script, not a test): latency, memory and HTTP throughput of shipped adapters.

    python benchmarks/serving.py [--steps 15] [--examples 256] [--requests 320] [--bf16/--no-bf16] [RUN_DIR ...]

On the real default MiniLM it (1) trains tiny LoRA / IA3 / bottleneck runs on sst2 (unless run folders are
given), (2) prints per-example latency of the base alone vs the unmerged adapter vs the merged model,
(3) RSS of serving 1 vs 10 adapters on one base, (4) throughput and p50/p99 latency of the HTTP server with 16
concurrent clients on 127.0.0.1, single-adapter vs mixed-adapter traffic. Bounded: stops by itself. Precision as
`peftkit serve` picks it (bf16 autocast where it pays) unless --bf16/--no-bf16 says.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_runs(root: Path, steps: int) -> list[Path]:
    from peftkit.config import RunConfig
    from peftkit.loop import train

    out = []
    for method in ("lora", "ia3", "bottleneck"):
        config = RunConfig.from_dict(
            {
                "recipe": f"bench-{method}",
                "task": {"name": "sst2", "max_length": 64, "max_train_examples": steps * 8, "max_eval_examples": 16},
                "model": {"name_or_path": "default"},
                "method": {"name": method},
                "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "progress": False, "output_dir": str(root)},
            }
        )
        train(config, run_dir=root / method)
        out.append(root / method)
    return out


def time_per_example(model, split, bf16: bool, repeats: int = 2) -> float:
    from peftkit.inference import predict_logits

    predict_logits(model, split, 32, torch.device("cpu"), bf16)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predict_logits(model, split, 32, torch.device("cpu"), bf16)
        best = min(best, time.perf_counter() - start)
    return best / len(split) * 1000


def latency_table(run_dirs: list[Path], texts: list[str], bf16: bool) -> None:
    from peftkit.artifacts import load
    from peftkit.config import ModelConfig
    from peftkit.data import encode
    from peftkit.modeling import load_model

    print("## Latency per example (ms, batch 32, best of 2, sst2 validation texts, max_length 64)\n")
    print("| method | base alone | unmerged adapter | merged | merged / base |")
    print("|---|---|---|---|---|")
    for run in run_dirs:
        loaded = load(run / "adapter")
        split = encode([{"text": t} for t in texts], loaded.tokenizer, 64)
        base = load_model(
            ModelConfig(name_or_path=loaded.meta.base_model), len(loaded.label_names), loaded.tokenizer.pad_token_id
        ).eval()
        t_base = time_per_example(base, split, bf16)
        t_adapter = time_per_example(loaded.model, split, bf16)
        if loaded.method.merge_blocker is None:
            merged = loaded.method.merge(loaded.model).eval()
            t_merged = time_per_example(merged, split, bf16)
            t_base = min(t_base, time_per_example(base, split, bf16))  # re-measure: the CPU is shared
            merged_cells = f"{t_merged:.3f} | {t_merged / t_base:.3f}x"
        else:
            merged_cells = "cannot merge | -"
        print(f"| {loaded.meta.method} | {t_base:.3f} | {t_adapter:.3f} | {merged_cells} |")
        del loaded, base
    print()


def memory_table(lora_adapter: Path, bf16: bool, n: int = 10) -> None:
    import gc

    from peftkit.serve import AdapterPool

    gc.collect()
    before = rss_mb()
    pool = AdapterPool("default", bf16=bf16)
    pool.add("lora0", lora_adapter)
    pool.predict([("lora0", ["warm up"], None)])
    gc.collect()
    one = rss_mb()
    for i in range(1, n):
        pool.add(f"lora{i}", lora_adapter)
    pool.predict([(f"lora{i}", ["warm up"], None) for i in range(n)])
    gc.collect()
    many = rss_mb()
    print("## Memory of serving LoRA adapters on one base (process RSS)\n")
    print("| adapters | RSS (MB) | over process before the base |")
    print("|---|---|---|")
    print(f"| 1 | {one:.0f} | {one - before:.0f} |")
    print(f"| {n} | {many:.0f} | {many - before:.0f} |")
    serving_part = (many - before) / max(one - before, 1e-9)
    print(f"\n{n} vs 1 adapter: {many / one:.3f}x total RSS ({serving_part:.3f}x of the serving part)\n")


async def load_test(port: int, adapters: list[str], texts: list[str], requests: int, clients: int = 16) -> dict:
    import httpx

    latencies: list[float] = []
    counter = iter(range(requests))

    async def client(c: httpx.AsyncClient, k: int) -> None:
        for i in counter:
            body = {"adapter": adapters[i % len(adapters)], "texts": [texts[i % len(texts)]]}
            start = time.perf_counter()
            reply = await c.post(f"http://127.0.0.1:{port}/v1/classify", json=body)
            latencies.append(time.perf_counter() - start)
            reply.raise_for_status()

    async with httpx.AsyncClient(timeout=60) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, k) for k in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": len(latencies) / wall,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
    }


def server_table(lora_adapter: Path, ia3_adapter: Path, texts: list[str], requests: int, bf16: bool) -> None:
    import socket

    import uvicorn

    from peftkit.serve import create_app

    adapters = {f"lora{i}": str(lora_adapter) for i in range(8)} | {"ia3": str(ia3_adapter)}
    app = create_app("default", adapters, max_batch=64, bf16=bf16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        asyncio.run(load_test(port, ["lora0"], texts, 32))  # warm-up
        print(f"## HTTP server, 16 concurrent clients on 127.0.0.1, {requests} requests of 1 text each\n")
        print("| traffic | requests/s | p50 (ms) | p99 (ms) | model passes |")
        print("|---|---|---|---|---|")
        for label, names in (
            ("single adapter (lora0)", ["lora0"]),
            ("mixed: 8 LoRA adapters (one mixed-batch pass)", [f"lora{i}" for i in range(8)]),
            ("mixed: 8 LoRA + IA3 (grouped passes)", [*(f"lora{i}" for i in range(8)), "ia3"]),
        ):
            before = app.state.batcher.batches
            r = asyncio.run(load_test(port, names, texts, requests))
            passes = app.state.batcher.batches - before
            print(f"| {label} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {passes} |")
        print()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def main() -> None:
    from peftkit.cli.predict import add_bf16_argument

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run folders (lora, ia3, bottleneck); default: train tiny ones")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--requests", type=int, default=320)
    add_bf16_argument(parser)  # serve's flag and default, as serve_load.py
    args = parser.parse_args()
    from peftkit.console import quiet_libraries
    from peftkit.data import read_rows
    from peftkit.precision import precision_name, resolve_bf16

    quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = Path(os.environ.get("PEFTKIT_DATA", "/work/shared/data"))
    texts = [r["text"] for r in read_rows(data / "sst2" / "validation.jsonl")[: args.examples]]
    bf16 = resolve_bf16(args.bf16, torch.device("cpu"))
    threads = f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    print(f"torch {torch.__version__}, {threads}, {precision_name(bf16)}\n")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        runs = [Path(r) for r in args.runs] or train_runs(Path(tmp), args.steps)
        print(f"(trained/loaded {len(runs)} runs in {time.perf_counter() - start:.0f} s)\n")
        latency_table(runs, texts, bf16)
        lora = next(r for r in runs if "lora" in r.name) / "adapter"
        ia3 = next(r for r in runs if "ia3" in r.name) / "adapter"
        memory_table(lora, bf16)
        server_table(lora, ia3, texts, args.requests, bf16)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
