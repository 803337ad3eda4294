"""A quantized base on CPU (bitsandbytes LLM.int8 and NF4): LoRA trains, evaluates and trains again, the head and
pooler stay full precision, and the exported adapter loads onto the full-precision base."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'peftkit[quantization]')")

from peftkit.adapters import MethodContext, build_method
from peftkit.adapters.lora import LoraOptions
from peftkit.artifacts import load
from peftkit.config import ModelConfig
from peftkit.errors import PeftkitError
from peftkit.export import model_card
from peftkit.loop import train
from peftkit.modeling import head_modules, load_model


@pytest.fixture(scope="module")
def bert64(tmp_path_factory):
    """A tiny BERT as wide as one 4-bit quantisation block (64), so bitsandbytes' CPU repack can run on it."""
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from peftkit.modeling import resolve_model_path

    path = tmp_path_factory.mktemp("bert64")
    torch.manual_seed(0)
    AutoModel.from_config(
        BertConfig(
            vocab_size=30522,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
        )
    ).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path("default")).save_pretrained(path)
    return path


def lora_on(path, kind):
    model = load_model(ModelConfig(str(path), quantization=kind), 2, pad_token_id=0)
    method = build_method("lora", LoraOptions(r=4, target_modules=["query", "value"]))
    return model, method.apply(model, MethodContext(str(path), head_modules(model), total_steps=10))


def train_steps(model, optimizer, x, y, n):
    model.train()
    losses = []
    for _ in range(n):
        out = model(input_ids=x, labels=y)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return losses


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_lora_trains_evaluates_and_trains_again(kind, bert64):
    import bitsandbytes as bnb

    base, model = lora_on(bert64, kind)
    layer = bnb.nn.Linear8bitLt if kind == "8bit" else bnb.nn.Linear4bit
    body = base.bert.encoder.layer[0]
    assert isinstance(body.attention.self.key, layer), "the body must be quantized"
    for head in (base.bert.pooler.dense, base.classifier.modules_to_save["default"]):
        assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32, "head and pooler stay fp32"
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randint(1000, 2000, (8, 9), generator=generator), torch.tensor([0, 1] * 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    first = train_steps(model, optimizer, x, y, 6)
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    if kind == "4bit":  # what that eval pass does on CPUs with AVX512-BF16 (this one may lack it): repack in place
        from bitsandbytes.functional import _convert_weight_packed_for_cpu

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                assert module.support_avx512bf16_for_cpu is False, "peftkit turns the CPU inference repack off"
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(
                    module.weight.data, module.weight.quant_state
                )
    before = lora_weights(model)
    second = train_steps(model, optimizer, x, y, 6)
    after = lora_weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n), "LoRA weights must keep moving"
    if kind == "4bit":  # training ran on the unpacked layout (the packed one has no autograd path through the base)
        packed = [
            m
            for m in model.modules()
            if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
        ]
        assert not packed, "a training forward must unpack bitsandbytes' CPU inference layout first"
    assert second[-1] < first[0] and second[-1] < second[0], (first, second)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_run_through_the_loop_exports_an_adapter_for_the_full_precision_base(
    kind, bert64, toy_task_dir, tmp_path
):
    from peftkit.config import RunConfig

    config = RunConfig.from_dict(
        {
            "task": {"name": str(toy_task_dir), "max_length": 16},
            "model": {"name_or_path": str(bert64), "quantization": kind},
            "method": {"name": "lora", "r": 4},
            "train": {
                "max_steps": 6,
                "eval_every": 2,
                "batch_size": 8,
                "lr": 1e-2,
                "progress": False,
                "log_every": 1,
                "seed": 1,
            },
        }
    )
    summary = train(config, run_dir=tmp_path / "run")
    assert summary.steps == 6
    loaded = load(
        tmp_path / "run" / "adapter"
    )  # onto the full-precision base: the adapter does not know the base was quantized
    assert not any("bitsandbytes" in type(m).__module__ for m in loaded.model.modules())
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.randint(1000, 2000, (2, 5))).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    # the metrics are the quantized model's: the adapter and its card say which base measured them
    assert loaded.meta.base_quantization == kind
    card = model_card(loaded.meta, None)
    assert f"a {kind} bitsandbytes-quantized base" in card


@pytest.mark.parametrize("method", ["prompt", "bitfit", "vera"])
def test_methods_without_kbit_layers_refuse_a_quantized_base(method, tiny_run_config, tmp_path):
    config = tiny_run_config(method)
    config.model.quantization = "8bit"
    with pytest.raises(PeftkitError, match="cannot train on a quantized base"):
        train(config, run_dir=tmp_path / "run")


def test_unknown_quantization_is_a_clear_error():
    from peftkit.recipe_files import load_config

    with pytest.raises(PeftkitError, match="Valid: 4bit, 8bit"):
        load_config(recipe="sst2-lora", overrides=["model.quantization=3bit"])


def test_every_head_layer_stays_full_precision(tiny_model_dir):
    """ModernBERT's `head` (dense + norm) is head beside the classifier: found by the rule (head_modules), not by
    name, so it is not quantized (bitsandbytes would have turned head.dense into an int8 layer)."""
    folder = tiny_model_dir("modernbert", hidden_size=64, intermediate_size=128)
    model = load_model(ModelConfig(str(folder), quantization="8bit"), 2, pad_token_id=0)
    assert type(model.head.dense) is torch.nn.Linear and type(model.classifier) is torch.nn.Linear
    assert type(model.model.layers[0].mlp.Wi) is not torch.nn.Linear  # the body is quantized
