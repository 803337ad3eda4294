"""The real model on real data: MiniLM (22.7M) learns SST-2 with LoRA in about a minute of CPU training,
and the adapter it ships loads in stock peft with identical logits."""

from __future__ import annotations

import json

import pytest
import torch

from peftkit.loop import train
from peftkit.recipe_files import load_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sst2_lora_run(shared_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("sst2") / "run"
    config = load_config(
        recipe="sst2-lora",
        overrides=[
            f"task.data_dir={shared_data}",
            "train.max_steps=250",
            "train.batch_size=16",
            "train.lr=1e-3",
            "train.head_lr=3e-3",
            "train.eval_every=125",
            "train.progress=false",
            "train.log_every=25",
        ],
    )
    return run, train(config, run_dir=run)


def test_lora_learns_sst2(sst2_lora_run):
    run, summary = sst2_lora_run
    assert summary.validation_examples == 872
    assert summary.best["accuracy"] > 0.75, summary.best  # chance is 0.51
    lines = (run / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["task_loss"] for line in lines if "task_loss" in line]
    assert len(losses) == 10 and losses[-1] < 0.8 * losses[0], losses  # 25-step mean training loss fell
    # r=8 on query/value (73,728) + head: classifier (770) + the pooler it pools with (model.pooling auto -> pooler)
    assert summary.trainable_params == 73_728 + 770 + 384 * 384 + 384


def test_exported_adapter_loads_in_stock_peft_with_identical_logits(sst2_lora_run):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.artifacts import load
    from peftkit.modeling import resolve_model_path

    run, _ = sst2_lora_run
    ours = load(run / "adapter")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # portable, no venv path
    path = resolve_model_path("default")
    torch.manual_seed(123)  # a different head init: the saved head must replace it
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    stock = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    batch = AutoTokenizer.from_pretrained(path)(
        ["a gorgeous, witty film", "a dull, lifeless mess"], padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        expected = ours.model(**batch).logits
        assert torch.equal(stock(**batch).logits, expected)
    assert expected.argmax(-1).tolist() == [1, 0]
