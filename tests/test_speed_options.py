"""The loop's speed options: bf16 chosen where it pays, gradient checkpointing, TensorBoard logging, timing."""

from __future__ import annotations

import json

import pytest
import torch

from peftkit.loop import train
from peftkit.precision import bf16_pays, resolve_bf16


def test_bf16_setting_true_false_or_auto():
    cpu = torch.device("cpu")
    assert resolve_bf16(True, cpu) is True and resolve_bf16(False, cpu) is False
    assert resolve_bf16(None, cpu) is bf16_pays(cpu)


def test_auto_bf16_follows_the_cpu_and_false_forces_fp32(tiny_run_config, tmp_path, monkeypatch):
    import peftkit.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert train(tiny_run_config("lora", max_steps=1), run_dir=tmp_path / "auto").bf16 is True
    assert train(tiny_run_config("lora", max_steps=1, bf16=False), run_dir=tmp_path / "fp32").bf16 is False
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert train(tiny_run_config("lora", max_steps=1), run_dir=tmp_path / "plain").bf16 is False


@pytest.fixture
def held_by_loop(monkeypatch):
    """Each call the loop makes to hold_frozen_linears_in_bf16, as the number of linear weights it left in bf16."""
    from torch import nn

    import peftkit.loop as loop

    held = []
    hold = loop.hold_frozen_linears_in_bf16

    def counting(model):
        restore = hold(model)
        held.append(sum(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in model.modules()))
        return restore

    monkeypatch.setattr(loop, "hold_frozen_linears_in_bf16", counting)
    return held


def test_held_bf16_linears_are_the_frozen_ones_and_come_back_exactly(tiny_model_dir):
    from torch import nn

    from peftkit.adapters import MethodContext, build_method
    from peftkit.config import ModelConfig
    from peftkit.modeling import load_model
    from peftkit.precision import hold_frozen_linears_in_bf16

    model = build_method("lora").apply(
        load_model(ModelConfig(str(tiny_model_dir("bert"))), 2, 0), MethodContext("x", ["classifier"])
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    restore = hold_frozen_linears_in_bf16(model)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    frozen = {n for n, m in linears.items() if not m.weight.requires_grad}
    assert frozen and all(linears[n].weight.dtype == torch.bfloat16 for n in frozen)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA and the head
    assert all(linears[n].bias.dtype == torch.float32 for n in frozen)
    restore()
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in model.named_parameters())


def test_holding_frozen_linears_in_bf16_gives_the_same_update_as_autocast_alone(
    tiny_run_config, tiny_model_dir, tmp_path, monkeypatch, held_by_loop
):
    """The held bf16 weights are exactly autocast's casts: with it and without it, training gives the same adapter."""
    from peftkit.adapters.lora import LoRA
    from peftkit.io import load_tensors

    still = str(tiny_model_dir("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    weights = {}
    for name, held in (("held", True), ("cast", False)):
        monkeypatch.setattr(LoRA, "frozen_linears_in_bf16", held)
        config = tiny_run_config("lora", method_options={"dropout": 0.0}, max_steps=3, bf16=True)
        config.model.name_or_path = still
        assert train(config, run_dir=tmp_path / name).bf16 is True
        weights[name] = load_tensors(tmp_path / name / "adapter" / "adapter_model.safetensors")
    only_when_allowed = "the loop holds the frozen linears for LoRA, and only when the method allows it"
    assert len(held_by_loop) == 1 and held_by_loop[0] > 0, only_when_allowed
    assert weights["held"].keys() == weights["cast"].keys()
    assert all(torch.allclose(weights["held"][k], weights["cast"][k], atol=1e-6) for k in weights["held"])


@pytest.mark.parametrize("method", ["adalora", "ia3", "bitfit", "head", "bottleneck", "prompt", "prefix", "ptuning"])
def test_methods_that_allow_held_bf16_linears_train_with_them(method, tiny_run_config, tmp_path, held_by_loop):
    summary = train(tiny_run_config(method, max_steps=2, bf16=True), run_dir=tmp_path / "run")
    assert summary.bf16 is True and summary.steps == 2
    assert len(held_by_loop) == 1 and held_by_loop[0] > 0, "the loop held this method's frozen linear weights in bf16"


def test_embedding_row_gradients_add_into_one_kept_buffer(tiny_model_dir):
    from peftkit.adapters import MethodContext, build_method
    from peftkit.config import ModelConfig
    from peftkit.embedding_grads import EmbeddingGradBuffers
    from peftkit.modeling import load_model

    model = load_model(ModelConfig(str(tiny_model_dir("bert"))), 2, 0)
    words, positions = model.bert.embeddings.word_embeddings, model.bert.embeddings.position_embeddings
    ids = torch.tensor([[101, 7592, 7592, 2088, 102, 0]])
    model(input_ids=ids).logits.sum().backward()
    dense = words.weight.grad.clone()
    model.zero_grad(set_to_none=True)

    buffers = EmbeddingGradBuffers.keep(model)
    assert [module for module, _ in buffers.kept] == [words], "the word table only: positions are too small to gain"
    assert words.sparse and not positions.sparse
    buffer = words.weight.grad
    for _ in range(2):  # the same buffer every step, zeroed between them
        model(input_ids=ids).logits.sum().backward()
        assert words.weight.grad is buffer and not buffer.is_sparse
        assert torch.allclose(buffer, dense, atol=1e-7) and buffer.abs().sum() > 0
        model.zero_grad(set_to_none=True)
        buffers.zero()
        assert words.weight.grad is buffer and not buffer.any()
    buffers.release()
    assert not words.sparse and words.weight.grad is None

    lora = build_method("lora").apply(
        load_model(ModelConfig(str(tiny_model_dir("bert"))), 2, 0), MethodContext("x", ["classifier"])
    )
    assert EmbeddingGradBuffers.keep(lora).kept == [], "a frozen table keeps no buffer"


def test_embedding_row_gradients_give_the_same_full_fine_tuning(
    tiny_run_config, tiny_model_dir, tmp_path, monkeypatch
):
    import peftkit.loop as loop
    from peftkit.adapters.base import WEIGHTS_FILE
    from peftkit.embedding_grads import EmbeddingGradBuffers
    from peftkit.io import load_tensors

    still = str(tiny_model_dir("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    made, switched, weights = [], [], {}
    original = EmbeddingGradBuffers.keep

    def keep(model, rows):
        made.append(original(model) if rows else EmbeddingGradBuffers())
        switched.append(len(made[-1].kept))
        return made[-1]

    for name, rows in (("rows", True), ("dense", False)):
        monkeypatch.setattr(loop.EmbeddingGradBuffers, "keep", lambda model, rows=rows: keep(model, rows))
        config = tiny_run_config("full", max_steps=3, bf16=False)
        config.model.name_or_path = still
        train(config, run_dir=tmp_path / name)
        weights[name] = load_tensors(tmp_path / name / "adapter" / WEIGHTS_FILE)
    assert switched == [1, 0], "the loop switched the word table to row gradients"
    assert made[0].kept == [], "and switched it back when training ended"
    assert any("word_embeddings" in k for k in weights["rows"]) and weights["rows"].keys() == weights["dense"].keys()
    assert all(torch.allclose(weights["rows"][k], weights["dense"][k], atol=1e-6) for k in weights["rows"])


def test_gradient_checkpointing_gives_the_same_update(tiny_run_config, tiny_model_dir, tmp_path):
    from peftkit.io import load_tensors

    still = str(tiny_model_dir("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    weights = {}
    for name, ckpt in (("plain", False), ("ckpt", True)):
        config = tiny_run_config(
            "lora", method_options={"dropout": 0.0}, max_steps=2, bf16=False, gradient_checkpointing=ckpt
        )
        config.model.name_or_path = still
        train(config, run_dir=tmp_path / name)
        weights[name] = load_tensors(tmp_path / name / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(weights["plain"][k], weights["ckpt"][k], atol=1e-6) for k in weights["plain"])


def test_full_fine_tuning_trains_with_gradient_checkpointing(tiny_run_config, tmp_path):
    summary = train(tiny_run_config("full", max_steps=2, gradient_checkpointing=True), run_dir=tmp_path / "run")
    assert summary.steps == 2


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tiny_run_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(tiny_run_config("lora", eval_every=2, report_to=["tensorboard"]), run_dir=run)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["task_loss"] for r in records if "task_loss" in r}
    accuracy = {r["step"]: r["accuracy"] for r in records if r.get("split") == "validation"}
    assert {e.step: round(e.value, 5) for e in events.Scalars("train/task_loss")} == pytest.approx(losses)
    assert {e.step: e.value for e in events.Scalars("validation/accuracy")} == pytest.approx(accuracy)
    assert "train/tokens_per_s" in events.Tags()["scalars"]


def test_report_to_is_off_by_default_and_checked(tiny_run_config, tmp_path):
    from peftkit.errors import PeftkitError

    train(tiny_run_config("lora", max_steps=1), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "tensorboard").exists()
    with pytest.raises(PeftkitError, match="report_to"):
        tiny_run_config("lora", report_to=["wandb"])


def test_evaluation_is_not_training_time(tiny_run_config, tmp_path, monkeypatch):
    import time

    import peftkit.loop as loop

    real = loop.evaluate

    def slow(*args, **kwargs):
        time.sleep(4.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", slow)
    summary = train(tiny_run_config("lora", max_steps=2, eval_every=1), run_dir=tmp_path / "run")
    assert summary.train_seconds < 4.0, summary.train_seconds  # two 4 s evaluations left out
