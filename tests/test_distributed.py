"""The same loop under torchrun on CPU (gloo): DDP with sharded batches, FSDP2 sharding (matches one process, holds
less per rank, resumes exactly), and two single-process launchers meeting through c10d rendezvous as two "nodes"."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

# one thread per rank; gloo on the loopback interface (the ranks all run on this machine)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(config, path: Path) -> Path:
    data = config.to_dict()
    data.pop("recipe")
    path.write_text(yaml.safe_dump(data))
    return path


def torchrun(config_path: Path, run: Path, *extra: str, nproc: int = 2, resume: bool = False, timeout: int = 300):
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
    ]
    target = ["--resume", str(run)] if resume else ["--config", str(config_path), "--run-dir", str(run)]
    return subprocess.run(
        [*launch, "-m", "peftkit", "train", *target, *extra], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def one_process(config_path: Path, run: Path, *extra: str):
    return subprocess.run(
        [sys.executable, "-m", "peftkit", "train", "--config", str(config_path), "--run-dir", str(run), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )


def adapter(run: Path) -> dict[str, torch.Tensor]:
    [weights] = (run / "adapter").glob("*.safetensors")
    return load_file(weights)


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["task_loss"] for r in map(json.loads, lines) if "task_loss" in r]


def test_two_process_torchrun_trains_and_rank0_saves(tiny_run_config, tmp_path):
    path = write_config(tiny_run_config("lora", max_steps=3, checkpoint_every=2), tmp_path / "recipe.yaml")
    run = tmp_path / "run"
    result = torchrun(path, run)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["examples_seen"] == 3 * 8 * 2  # per-rank batch 8 on each of 2 ranks
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert result.stdout.count("validation accuracy") == 1  # rank 0 speaks for the run


def test_torchrun_logs_the_global_batch_loss(tiny_model_dir, tiny_run_config, tmp_path):
    """2 ranks x 8 log the loss of the global batch of 16, as one process does, not rank 0's half of it."""
    config = tiny_run_config("lora", method_options={"dropout": 0.0}, max_steps=2, bf16=False)
    config.model.name_or_path = str(tiny_model_dir("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    path = write_config(config, tmp_path / "lora.yaml")
    single = one_process(path, tmp_path / "single", "train.batch_size=16")
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = torchrun(path, tmp_path / "ddp", "train.batch_size=8")
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), abs=2e-5)


@pytest.mark.integration
def test_fsdp_full_finetuning_matches_one_process_and_holds_less_per_rank(tiny_model_dir, tiny_run_config, tmp_path):
    """Hidden 256 x 4 layers, full fine-tuning: the same global batch (2 ranks x 8 = 1 process x 16) gives the same
    weights within fp tolerance, and each rank holds about half the weights + gradients + AdamW moments."""
    from transformers import AutoModel, AutoTokenizer, BertConfig

    model = tmp_path / "bert-256x4"
    torch.manual_seed(0)
    AutoModel.from_config(
        BertConfig(
            vocab_size=30522,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_model_dir("bert")).save_pretrained(model)
    # fp32: the 1e-4 below is fp32's tolerance; on a CPU with AMX / AVX512-BF16, auto would pick bf16 autocast
    config = tiny_run_config("full", max_steps=12, lr=3e-4, head_lr=1e-3, warmup_ratio=0.0, bf16=False)
    config.model.name_or_path = str(model)
    path = write_config(config, tmp_path / "full.yaml")
    single = one_process(path, tmp_path / "single", "train.batch_size=16")
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = torchrun(path, tmp_path / "fsdp", "train.distributed=fsdp", "train.batch_size=8")
    assert sharded.returncode == 0, sharded.stderr[-3000:]

    one, two = adapter(tmp_path / "single"), adapter(tmp_path / "fsdp")
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    steps = losses(tmp_path / "fsdp")  # rank 0's half of each global batch
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("single", "fsdp"))
    print(
        f"\nmodel state MB: 1 process {s1['model_state_mb']}, FSDP per rank {s2['model_state_mb']}; "
        f"peak RSS above baseline MB: 1 process {s1['peak_memory_above_baseline_mb']}, "
        f"FSDP max over ranks {s2['peak_memory_above_baseline_mb']}; worst weight diff {worst:.2e}; "
        f"FSDP losses {steps}; accuracy 1 process {s1['best']['accuracy']}, FSDP {s2['best']['accuracy']}"
    )
    assert worst < 1e-4, worst
    assert sum(steps[-3:]) < sum(steps[:3]), steps
    assert s2["world_size"] == 2 and s2["examples_seen"] == s1["examples_seen"] == 12 * 16
    # weights + gradients + 2 AdamW moments held by the process (the larger rank under FSDP)
    assert s2["model_state_mb"] < 0.6 * s1["model_state_mb"], (s1["model_state_mb"], s2["model_state_mb"])


@pytest.mark.integration
def test_fsdp_lora_matches_one_process_and_resumes_exactly(tiny_model_dir, tiny_run_config, tmp_path):
    model = tiny_model_dir("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = tiny_run_config("lora", method_options={"dropout": 0.0}, max_steps=4, checkpoint_every=2, bf16=False)
    config.model.name_or_path = str(model)
    path = write_config(config, tmp_path / "lora.yaml")
    single = one_process(path, tmp_path / "single", "train.batch_size=16")
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = torchrun(path, tmp_path / "fsdp", "train.distributed=fsdp", "train.batch_size=8")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one, two = adapter(tmp_path / "single"), adapter(tmp_path / "fsdp")
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    assert sorted(p.name for p in (tmp_path / "fsdp" / "adapter").iterdir()) == sorted(
        p.name for p in (tmp_path / "single" / "adapter").iterdir()
    )  # the same PEFT layout as one process
    # the checkpoint at step 2 (gathered, safetensors) resumes to the same weights, bitwise: a kill after it
    run = tmp_path / "fsdp"
    (run / "summary.json").unlink()  # a finished run is refused
    shutil.rmtree(run / "adapter")
    for later in (p for p in (run / "checkpoints").glob("step-*") if int(p.name.split("-")[1]) > 2):
        shutil.rmtree(later)
    resumed = torchrun(path, run, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = adapter(tmp_path / "fsdp")
    assert all(torch.equal(two[k], again[k]) for k in two)


def test_fsdp_refuses_other_methods(tiny_run_config, tmp_path):
    path = write_config(tiny_run_config("ia3", max_steps=1), tmp_path / "ia3.yaml")
    result = torchrun(path, tmp_path / "run", "train.distributed=fsdp")
    assert result.returncode != 0
    assert "train.distributed=fsdp supports the methods full, lora, dora, not 'ia3'" in result.stderr


def launcher(config_path: Path, run: Path, port: int, *target: str) -> subprocess.Popen:
    """One simulated node: torchrun with one process, meeting the other through c10d rendezvous."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "peftkit-test",
        "--max-restarts",
        "0",
        "-m",
        "peftkit",
        "train",
        *target,
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True
    )


@pytest.mark.integration
def test_two_launchers_as_two_nodes_finish_and_resume(tiny_run_config, tmp_path):
    path = write_config(tiny_run_config("lora", max_steps=6, checkpoint_every=2), tmp_path / "recipe.yaml")
    run, port = tmp_path / "run", free_port()
    nodes = [launcher(path, run, port, "--config", str(path), "--run-dir", str(run)) for _ in range(2)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert sum(out.count("validation accuracy") for out, _ in outputs) == 1  # rank 0 alone reports
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
    ]
    finished = adapter(run)

    # kill one launcher mid-run: the other fails instead of hanging; the checkpoint then resumes on both
    (run / "summary.json").unlink()
    port = free_port()
    nodes = [launcher(path, run, port, "--resume", str(run), "train.max_steps=100000") for _ in range(2)]
    deadline = time.time() + 240
    while latest_step(run) < 8 and time.time() < deadline:
        time.sleep(0.2)
    kill_node(nodes[1].pid)  # the launcher and its worker, as when a machine goes down
    try:
        _, err = nodes[0].communicate(timeout=240)
    finally:
        kill_node(nodes[0].pid)
    nodes[1].communicate(timeout=30)
    assert nodes[0].returncode != 0, "the surviving launcher must fail, not hang or pretend to finish"
    print(f"\nsurviving launcher after the other was killed (exit {nodes[0].returncode}):\n{err[-1500:]}")
    target = latest_step(run) + 2
    port = free_port()
    nodes = [launcher(path, run, port, "--resume", str(run), f"train.max_steps={target}") for _ in range(2)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == target and adapter(run).keys() == finished.keys()
    print(f"resumed from step {target - 2} to {target}: " + [o for o, _ in outputs if o.strip()][0].strip())


def kill_node(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in their own sessions)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += parents.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def latest_step(run: Path) -> int:
    """The newest complete checkpoint's step (a write in progress is a dotted temp folder)."""
    return max((int(p.name.removeprefix("step-")) for p in (run / "checkpoints").glob("step-*")), default=0)
