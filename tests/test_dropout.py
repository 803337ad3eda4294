"""Hash dropout masks: the same Bernoulli keep rate as nn.Dropout, independent draws, exact gradients, reproducible
from torch's generator, and an attention path equal to transformers' sdpa."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.dropout import HashDropout, hash_dropout, math_attention, scaled_keep_mask, use_hash_dropout
from peftkit.errors import PeftkitError


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_is_one_minus_p(p):
    n = 1_000_000
    mask = scaled_keep_mask((n,), p, seed=123, device=torch.device("cpu"))
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    rate = (mask != 0).float().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5


def test_draws_are_independent_across_elements_and_seeds():
    cpu = torch.device("cpu")
    a = (scaled_keep_mask((1000, 1000), 0.1, seed=7, device=cpu) != 0).float()
    b = (scaled_keep_mask((1000, 1000), 0.1, seed=8, device=cpu) != 0).float()
    flat = a.flatten()
    neighbours = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()
    rows = torch.corrcoef(torch.stack([a[:-1].flatten(), a[1:].flatten()]))[0, 1].item()
    seeds = torch.corrcoef(torch.stack([flat, b.flatten()]))[0, 1].item()
    shifted = torch.corrcoef(torch.stack([flat[1:], b.flatten()[:-1]]))[0, 1].item()  # seed+1 is not a shift
    assert max(abs(neighbours), abs(rows), abs(seeds), abs(shifted)) < 0.01


def test_output_keeps_the_expectation_and_the_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.randn(400, 500, requires_grad=True)
    out = hash_dropout(x, 0.2)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.01
    assert torch.allclose(out[kept], x[kept] / 0.8)
    out.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.8)


def test_masks_follow_torch_seed_and_eval_or_p0_is_identity():
    x = torch.ones(64, 64)
    torch.manual_seed(3)
    first = hash_dropout(x, 0.1)
    torch.manual_seed(3)
    again = hash_dropout(x, 0.1)
    other = hash_dropout(x, 0.1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert hash_dropout(x, 0.1, training=False) is x and hash_dropout(x, 0.0) is x
    module = HashDropout(0.1).eval()
    assert torch.equal(module(x), x)


def _tiny(kind: str):
    from transformers import AutoModelForSequenceClassification, BertConfig, GPT2Config, LlamaConfig

    configs = {
        "bert": BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        ),
        "gpt2": GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1, eos_token_id=1
        ),
        "llama": LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            pad_token_id=0,
        ),
    }
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(configs[kind], attn_implementation="sdpa")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_the_attention_path_equals_sdpa_with_padding(kind, monkeypatch):
    """math_attention (with dropout 0) reproduces the stock sdpa logits, padding and causal masks included."""
    import peftkit.dropout as dropout

    model = _tiny(kind).eval()
    ids = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    reference = model(input_ids=ids, attention_mask=mask).logits

    def without_dropout(module, q, k, v, m, dropout=0.0, scaling=None, **kw):
        return math_attention(module, q, k, v, m, 0.0, scaling, **kw)

    monkeypatch.setattr(dropout, "hash_sdpa_attention", without_dropout)
    use_hash_dropout(model)
    assert model.config._attn_implementation == dropout.HASH_SDPA
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, reference, atol=1e-5)


def test_a_model_that_checks_the_attention_name_keeps_its_sdpa_path(tiny_model_dir, tiny_run_config, tmp_path):
    """Falcon runs SDPA only under the name "sdpa" (else an eager path that attends to the pads): its attention
    keeps torch's dropout, so eval logits and a row's independence from its batch survive, and the summary says so."""
    from peftkit.config import ModelConfig
    from peftkit.data import encode
    from peftkit.inference import predict_logits
    from peftkit.loop import train
    from peftkit.modeling import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_model_dir("falcon")))
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, 2, tokenizer.pad_token_id).eval()
    split = encode([{"text": t} for t in ("good", "a dull , lifeless and far too long film")], tokenizer, 32)
    cpu = torch.device("cpu")
    batched = predict_logits(model, split, 8, cpu, False)
    use_hash_dropout(model)
    assert torch.allclose(predict_logits(model, split, 8, cpu, False), batched, atol=1e-6)
    assert torch.allclose(predict_logits(model, split, 1, cpu, False), batched, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    summary = train(tiny_run_config("lora", kind="falcon", max_steps=1), run_dir=tmp_path / "run")
    assert "FalconForSequenceClassification" in summary.extra["attention_dropout_rng"]


def test_switched_model_trains_reproducibly_and_evaluates_unchanged():
    model = _tiny("bert")
    ids = torch.randint(1, 100, (4, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 0, 1])
    model.eval()
    before = model(input_ids=ids).logits
    assert use_hash_dropout(model) == sum(1 for m in model.modules() if isinstance(m, nn.Dropout))
    assert all(type(m) is HashDropout for m in model.modules() if isinstance(m, nn.Dropout))
    assert torch.equal(model(input_ids=ids).logits, before)  # eval: no dropout anywhere
    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        losses.append(model(input_ids=ids, labels=labels).loss)
    assert torch.equal(losses[0], losses[1])
    losses[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_replays_the_same_masks(tiny_run_config, tmp_path):
    """Dropout on (model 0.1 + LoRA 0.1): a checkpointed run recomputes with the same masks, so the update matches."""
    from peftkit.io import load_tensors
    from peftkit.loop import train

    weights = {}
    for name, ckpt in (("plain", False), ("ckpt", True)):
        config = tiny_run_config("lora", max_steps=2, bf16=False, gradient_checkpointing=ckpt)
        train(config, run_dir=tmp_path / name)
        weights[name] = load_tensors(tmp_path / name / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(weights["plain"][k], weights["ckpt"][k], atol=1e-6) for k in weights["plain"])


def test_the_loop_uses_hash_masks_by_default_and_torch_on_request(tiny_run_config, tmp_path, monkeypatch):
    import peftkit.loop as loop

    calls = []
    monkeypatch.setattr(loop, "use_hash_dropout", lambda model: calls.append(model) or 0)
    loop.train(tiny_run_config("lora", max_steps=1), run_dir=tmp_path / "hash")
    loop.train(tiny_run_config("lora", max_steps=1, dropout_rng="torch"), run_dir=tmp_path / "torch")
    assert len(calls) == 1
    with pytest.raises(PeftkitError, match="hash"):
        tiny_run_config("lora", dropout_rng="fast")


def test_masks_larger_than_a_chunk_are_made_chunk_by_chunk(monkeypatch):
    import peftkit.dropout as dropout

    whole = dropout.scaled_keep_mask((3000,), 0.3, seed=11, device=torch.device("cpu"))
    monkeypatch.setattr(dropout, "CHUNK", 1024)
    monkeypatch.setattr(dropout, "_hashed_indices", {})
    chunked = dropout.scaled_keep_mask((3000,), 0.3, seed=11, device=torch.device("cpu"))
    assert dropout._hashed_indices[torch.device("cpu")].numel() == 1024  # the cache stops at one chunk
    assert torch.equal(whole[:1024], chunked[:1024]) and not torch.equal(whole[1024:2048], chunked[1024:2048])
    rate = (chunked != 0).float().mean().item()
    assert abs(rate - 0.7) < 0.05
    second = (chunked[1024:2048] != 0).float()
    first = (chunked[:1024] != 0).float()
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.1  # chunks are not copies
