"""The same loop under torchrun: 2 CPU processes (gloo), sharded batches, rank 0 writes the run folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml


def test_two_process_torchrun_trains_and_rank0_saves(tiny_run_config, tmp_path):
    config = tiny_run_config("lora", max_steps=3, checkpoint_every=2)
    path = tmp_path / "recipe.yaml"
    data = config.to_dict()
    data.pop("recipe")
    path.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         "-m", "peftkit", "train", "--config", str(path), "--run-dir", str(run)],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["examples_seen"] == 3 * 8 * 2  # per-rank batch 8 on each of 2 ranks
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert result.stdout.count("validation accuracy") == 1  # rank 0 speaks for the run
