"""Load test of `peftkit serve` (a script, not a test): many clients, malformed requests, adapters churned.

    python benchmarks/serve_load.py [--requests 10000] [--clients 16] [--malformed 0.1] [--max-seconds 900]

Loopback only and bounded: an in-process uvicorn server on 127.0.0.1 (a free port), the real default MiniLM base
with three tiny-trained sst2 adapters (two LoRAs sharing the mixed-batch PeftModel, one IA3), `--clients` keep-alive
HTTP clients sending `--requests` requests, of which `--malformed` are malformed (lone surrogates, empty or
oversized batches, unknown adapters, broken JSON, wrong types, ...). Meanwhile an admin client keeps loading and
unloading a fourth adapter ("churn"), posting a damaged folder (must be 400 and change nothing) and deleting
twice (404 the second time). It stops after the last request or `--max-seconds`, whichever comes first.

Reports requests/s, p50/p99 latency of valid requests, counts by status for each kind of request, and the
process RSS over time; writes benchmarks/results/serve_load.{md,json} with the exact command. The goal: every
valid request to a stable adapter answered 200, whatever its neighbours sent.

`--executor to_thread --trim-every 0` runs the batcher the way it ran before issue 11 (asyncio.to_thread's pool,
no malloc_trim), for comparing the RSS curve.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from load_plan import CHURN, STABLE, build_plan


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_adapters(root: Path, steps: int) -> dict[str, Path]:
    """Tiny sst2 runs on the default MiniLM (cached in `root` between invocations)."""
    from peftkit.config import RunConfig
    from peftkit.loop import train

    out = {}
    for name, method, seed in (("lora0", "lora", 0), ("lora1", "lora", 1), ("ia3", "ia3", 0), ("lora4", "lora", 2)):
        run = root / name
        options = {"r": 4} if name == "lora4" else {}
        if not (run / "adapter" / "peftkit.json").exists():
            shutil.rmtree(run, ignore_errors=True)
            config = RunConfig.from_dict(
                {
                    "recipe": f"load-{name}",
                    "task": {
                        "name": "sst2",
                        "max_length": 64,
                        "max_train_examples": steps * 8,
                        "max_eval_examples": 16,
                    },
                    "model": {"name_or_path": "default"},
                    "method": {"name": method, **options},
                    "train": {
                        "max_steps": steps,
                        "batch_size": 8,
                        "lr": 1e-3,
                        "progress": False,
                        "seed": seed,
                        "output_dir": str(root),
                    },
                }
            )
            train(config, run_dir=run)
        out[name] = run / "adapter"
    return out


def damaged_copy(good: Path, other_rank: Path, dst: Path) -> Path:
    """LoRA folder whose config says r=8 but whose weights are r=4 (loads half-way in peft, then fails)."""
    from peftkit.io import sha256_file

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(good, dst)
    shutil.copyfile(other_rank / "adapter_model.safetensors", dst / "adapter_model.safetensors")
    meta = json.loads((dst / "peftkit.json").read_text())
    meta["weights_sha256"] = {"adapter_model.safetensors": sha256_file(dst / "adapter_model.safetensors")}
    (dst / "peftkit.json").write_text(json.dumps(meta))
    return dst


class Results:
    def __init__(self):
        self.lock = threading.Lock()
        self.status: dict[str, Counter] = {}
        self.kinds: dict[str, Counter] = {}
        self.latency: list[float] = []
        self.examples: dict[str, str] = {}
        self.done = 0

    def record(self, category: str, kind: str, status: int, seconds: float, detail: str) -> None:
        with self.lock:
            self.status.setdefault(category, Counter())[status] += 1
            self.kinds.setdefault(f"{category}:{kind}", Counter())[status] += 1
            if category == "valid" and status == 200:
                self.latency.append(seconds)
            key = f"{category}:{kind}:{status}"
            if key not in self.examples and status != 200:
                self.examples[key] = detail[:200]
            self.done += 1


def client_loop(port: int, plan, cursor, results: Results, deadline: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while time.monotonic() < deadline:
        with cursor["lock"]:
            i = cursor["next"]
            cursor["next"] += 1
        if i >= len(plan):
            break
        category, kind, body = plan[i]
        start = time.perf_counter()
        try:
            conn.request("POST", "/v1/classify", body=body, headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            data = reply.read()
            status = reply.status
            detail = data.decode("utf-8", "replace") if status != 200 else ""
        except (OSError, http.client.HTTPException) as e:  # a reset or timeout: counted, never hidden
            status, detail = 0, f"{type(e).__name__}: {e}"
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        results.record(category, kind, status, time.perf_counter() - start, detail)
    conn.close()


def admin_loop(
    port: int, token: str, folders: dict[str, Path], bad: Path, stop: threading.Event, counts: Counter, interval: float
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

    def call(method: str, path: str, body: dict | None = None, label: str = "") -> int:
        nonlocal conn
        try:
            conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
            reply = conn.getresponse()
            reply.read()
            status = reply.status
        except (OSError, http.client.HTTPException):
            status = 0
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        counts[f"{label or method} {status}"] += 1
        return status

    cycle = 0
    while not stop.wait(interval):
        source = folders["lora1"] if cycle % 2 else folders["lora4"]  # alternate ranks under one name
        call("POST", "/v1/adapters", {"name": CHURN, "path": str(source)}, "POST churn")
        call("POST", "/v1/adapters", {"name": "damaged", "path": str(bad)}, "POST damaged")
        if stop.wait(interval):
            break
        call("DELETE", f"/v1/adapters/{CHURN}", label="DELETE churn")
        call("DELETE", f"/v1/adapters/{CHURN}", label="DELETE churn again")
        call("GET", "/v1/adapters", label="GET adapters (admin)")
        cycle += 1
    conn.close()


def main() -> int:
    from peftkit.cli.predict import add_bf16_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--malformed", type=float, default=0.1, help="share of malformed requests")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long")
    parser.add_argument("--admin-interval", type=float, default=2.0, help="seconds between admin actions")
    parser.add_argument("--steps", type=int, default=4, help="training steps of each tiny adapter")
    parser.add_argument("--work", default="/tmp/peftkit-serve-load", help="where the tiny adapters are cached")
    parser.add_argument("--executor", choices=("dedicated", "to_thread"), default="dedicated")
    parser.add_argument("--trim-every", type=int, default=64, help="batches between malloc_trim calls (0: never)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load"))
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--note", default="", help="a line to add to the report (e.g. how busy the machine was)")
    add_bf16_argument(parser)  # the committed results ran before serve took bf16: fp32, i.e. --no-bf16
    args = parser.parse_args()

    import uvicorn

    from peftkit.console import quiet_libraries
    from peftkit.precision import precision_name
    from peftkit.serve import create_app

    quiet_libraries()
    work = Path(args.work)
    if args.prepare_only:
        train_adapters(work, args.steps)
        return 0
    # training happens in a child process, so this process's RSS is the server's alone
    subprocess.run(
        [sys.executable, __file__, "--prepare-only", "--work", str(work), "--steps", str(args.steps)], check=True
    )
    folders = train_adapters(work, args.steps)  # cached now: only paths
    bad = damaged_copy(folders["lora0"], folders["lora4"], work / f"damaged-{os.getpid()}")  # one per run
    texts = [
        json.loads(line)["text"]
        for line in (Path(os.environ.get("PEFTKIT_DATA", "../shared/data")) / "sst2" / "validation.jsonl")
        .read_text()
        .splitlines()[:400]
    ]
    plan = build_plan(args.requests, args.malformed, texts)
    token = "load-test-token"
    rss_start = rss_mb()
    app = create_app("default", {n: str(folders[n]) for n in STABLE}, admin_token=token, bf16=args.bf16)
    batcher = app.state.batcher
    batcher.trim_every = args.trim_every
    if args.executor == "to_thread":
        batcher.executor = None  # run_in_executor(None): the loop's default pool, as asyncio.to_thread uses
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    rss_loaded = rss_mb()

    results, cursor = Results(), {"next": 0, "lock": threading.Lock()}
    samples: list[dict] = []
    stop = threading.Event()
    admin_counts: Counter = Counter()
    started = time.monotonic()
    deadline = started + args.max_seconds

    def sampler():
        while not stop.wait(1.0):
            samples.append(
                {"s": round(time.monotonic() - started, 1), "done": results.done, "rss_mb": round(rss_mb())}
            )

    threads = [
        threading.Thread(target=sampler, daemon=True),
        threading.Thread(
            target=admin_loop, args=(port, token, folders, bad, stop, admin_counts, args.admin_interval), daemon=True
        ),
    ]
    clients = [
        threading.Thread(target=client_loop, args=(port, plan, cursor, results, deadline)) for _ in range(args.clients)
    ]
    load_before = os.getloadavg()
    for t in threads + clients:
        t.start()
    for t in clients:
        t.join()
    elapsed = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join(timeout=300)
    samples.append({"s": round(elapsed, 1), "done": results.done, "rss_mb": round(rss_mb())})
    server.should_exit = True
    thread.join(timeout=30)
    shutil.rmtree(bad, ignore_errors=True)
    # leak or heap? after the load, memory a leak holds stays; freed-but-cached malloc heap goes back on a trim
    import gc

    from peftkit.serve.batcher import _malloc_trim

    gc.collect()
    rss_after_gc = rss_mb()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    rss_after_trim = rss_mb()

    lat = sorted(results.latency)
    valid = results.status.get("valid", Counter())
    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "note": args.note,
        "executor": args.executor,
        "precision": precision_name(app.state.pool.bf16),
        "trim_every": args.trim_every,
        "requests_planned": len(plan),
        "requests_sent": results.done,
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests_per_s": round(results.done / elapsed, 1),
        "valid_p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "valid_p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        "status_by_category": {k: dict(sorted(v.items())) for k, v in sorted(results.status.items())},
        "status_by_kind": {k: dict(sorted(v.items())) for k, v in sorted(results.kinds.items())},
        "admin": dict(sorted(admin_counts.items())),
        "valid_stable_non_200": sum(c for s, c in valid.items() if s != 200),
        "any_5xx_or_reset_for_valid": sum(c for s, c in valid.items() if s >= 500 or s == 0),
        "batches": batcher.batches,
        "retried_batches": batcher.retried_batches,
        "rss_mb": {
            "start": round(rss_start),
            "server_loaded": round(rss_loaded),
            "end": samples[-1]["rss_mb"],
            "max": max(s["rss_mb"] for s in samples),
            "after_load_gc": round(rss_after_gc),
            "after_load_gc_and_malloc_trim": round(rss_after_trim),
        },
        "rss_curve": samples,
        "non_200_examples": results.examples,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(summary))
    print(report(summary))
    return 0 if summary["valid_stable_non_200"] == 0 else 1


def report(s: dict) -> str:
    curve = s["rss_curve"]
    step = max(1, len(curve) // 12)
    picked = curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else [])
    lines = [
        "# serve load test",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Machine: {s['machine']['cpus']} CPUs, load average {s['machine']['loadavg_before'][0]:.1f} before and "
        f"{s['machine']['loadavg_after'][0]:.1f} after (shared with other jobs); {s['machine']['platform']}.",
        *([f"Note: {s['note']}"] if s["note"] else []),
        "",
        f"Batcher: executor `{s['executor']}`, precision {s.get('precision') or 'fp32'}, "
        f"malloc_trim every {s['trim_every'] or 'never'} batches; "
        f"{s['batches']} batches, {s['retried_batches']} retried one by one.",
        "",
        f"**{s['requests_sent']} requests** ({s['requests_planned']} planned) from {s['clients']} clients in "
        f"{s['seconds']} s: **{s['requests_per_s']} requests/s**; valid requests p50 **{s['valid_p50_ms']} ms**, "
        f"p99 **{s['valid_p99_ms']} ms**.",
        "",
        f"Valid requests to stable adapters not answered 200: **{s['valid_stable_non_200']}** "
        f"(5xx or resets: {s['any_5xx_or_reset_for_valid']}).",
        "",
        "| category | status counts |",
        "|---|---|",
        *[f"| {k} | {', '.join(f'{st}: {c}' for st, c in v.items())} |" for k, v in s["status_by_category"].items()],
        "",
        "| request kind | status counts |",
        "|---|---|",
        *[f"| {k} | {', '.join(f'{st}: {c}' for st, c in v.items())} |" for k, v in s["status_by_kind"].items()],
        "",
        "| admin action | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in s["admin"].items()],
        "",
        f"RSS (MB): {s['rss_mb']['start']} at start, {s['rss_mb']['server_loaded']} with the base and 3 adapters "
        f"loaded, max {s['rss_mb']['max']}, {s['rss_mb']['end']} at the end; after the load "
        f"{s['rss_mb']['after_load_gc']} after gc.collect() and {s['rss_mb']['after_load_gc_and_malloc_trim']} "
        "after malloc_trim(0) (what a trim gives back was cached heap, not a leak).",
        "",
        "| seconds | requests done | RSS MB |",
        "|---:|---:|---:|",
        *[f"| {p['s']} | {p['done']} | {p['rss_mb']} |" for p in picked],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
