"""model.pooling: every pooling trains, ships and reloads with the head, for peft, peftkit and full methods;
`auto` reads the base folder; stock peft still loads `pooler`; the `head` probe trains only the head."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from peftkit.adapters import MethodContext, build_method
from peftkit.artifacts import load, save_adapter
from peftkit.config import ModelConfig
from peftkit.formats import AdapterMeta, TaskInfo
from peftkit.modeling import load_model, load_tokenizer, trained_head_modules

LABELS = ["a", "b", "c"]
TEXTS = ["a good film", "bad", "the plot was terrible and far too long", "fine"]


def _trained(path, method_name, pooling, steps=2):
    """A tiny model with `pooling` and `method`, trained a few SGD steps; returns it (eval), its method, a batch."""
    cfg = ModelConfig(name_or_path=str(path), pooling=pooling)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, len(LABELS), tokenizer.pad_token_id)
    heads = trained_head_modules(model)
    method = build_method(method_name)
    model = method.apply(model, MethodContext(str(path), heads, 10))
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    labels = torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    grads = {}
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        grads = {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, method, batch, heads, grads


def _save(model, method, path, directory, heads):
    return save_adapter(
        model,
        method,
        directory,
        base_model=str(path),
        task=TaskInfo(name="toy", label_names=LABELS),
        head_modules=heads,
    )


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean", "last"])
@pytest.mark.parametrize("method_name", ["lora", "bottleneck", "full"])
def test_pooling_trains_ships_and_reloads(tiny_model_dir, tmp_path, method_name, pooling):
    path = tiny_model_dir("bert")
    model, method, batch, heads, grads = _trained(path, method_name, pooling)
    pooler_grads = {n: g for n, g in grads.items() if ".pooler." in f".{n}."}
    if pooling == "pooler":
        assert heads == ["classifier", "bert.pooler.dense"]
        assert pooler_grads and all(g > 0 for g in pooler_grads.values()), grads.keys()
    else:
        assert heads == ["classifier"] and not pooler_grads  # parameter-free pooling replaces BERT's pooler
    assert any(g > 0 for n, g in grads.items() if ".classifier." in f".{n}.")
    meta = _save(model, method, path, tmp_path / "adapter", heads)
    assert meta.pooling == pooling and meta.head_modules == heads
    if pooling == "pooler" and method_name != "full":  # the pooler ships with the head
        from safetensors import safe_open

        name = "adapter_model.safetensors" if method.uses_peft else "peftkit_weights.safetensors"
        weights = tmp_path / "adapter" / name
        with safe_open(str(weights), framework="pt") as f:
            assert any(".pooler." in k for k in f.keys())
    with torch.no_grad():
        expected = model(**batch).logits
        loaded = load(tmp_path / "adapter")  # rebuilt weights: oneDNN may round a matmul 1 ulp differently
        torch.testing.assert_close(loaded.model(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_poolings_differ_and_mean_ignores_padding(tiny_model_dir):
    path = tiny_model_dir("bert")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
    logits = {}
    for pooling in ("pooler", "cls", "mean", "last"):
        model = load_model(ModelConfig(name_or_path=str(path), pooling=pooling), 3, tokenizer.pad_token_id).eval()
        with torch.no_grad():
            padded = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits[1]
            alone = model(**tokenizer(TEXTS[1:2], return_tensors="pt")).logits[0]
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)  # pads change nothing
        logits[pooling] = alone
    assert len({tuple(v.tolist()) for v in logits.values()}) == 4


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_pooling_of_a_body_that_hands_its_pooler_a_slice(tiny_model_dir, pooling):
    """ALBERT's body calls its pooler on the [CLS] slice (2-D) and applies a tanh outside it: the classifier still
    reads `pooling` over every token state, not a shape error (or, were batch == hidden size, garbage)."""
    from peftkit.pooling import Pooling

    cfg = ModelConfig(name_or_path=str(tiny_model_dir("albert")), pooling=pooling)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, 3, tokenizer.pad_token_id).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    pool = Pooling(pooling)
    pool.mask = batch["attention_mask"]
    with torch.no_grad():
        expected = model.classifier(pool(model.albert(**batch).last_hidden_state))
        torch.testing.assert_close(model(**batch).logits, expected)


@pytest.mark.parametrize("pooling", ["auto", "cls", "mean"])
def test_a_head_pooling_by_its_config_is_recorded_and_an_explicit_pooling_wins(tiny_model_dir, pooling):
    """ModernBERT's head pools as config.classifier_pooling says (the released base: mean): `auto` records that,
    and an explicit `cls` is what the classifier reads, not the head's mean."""
    from peftkit.pooling import Pooling, pooling_of

    path = tiny_model_dir("modernbert", classifier_pooling="mean")
    cfg = ModelConfig(name_or_path=str(path), pooling=pooling)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, 3, tokenizer.pad_token_id).eval()
    mode = "mean" if pooling == "auto" else pooling
    assert pooling_of(model) == mode
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    pool = Pooling(mode)
    pool.mask = batch["attention_mask"]
    with torch.no_grad():
        pooled = pool(model.model(**batch).last_hidden_state)  # (a pooling peftkit applies is broadcast there)
        torch.testing.assert_close(model(**batch).logits, model.classifier(model.head(pooled)))


@pytest.mark.parametrize("kind,pooling", [("gpt2", "mean"), ("gpt2", "last"), ("llama", "cls")])
def test_decoder_poolings_train_and_reload(tiny_model_dir, tmp_path, kind, pooling):
    path = tiny_model_dir(kind)
    model, method, batch, heads, grads = _trained(path, "lora", pooling)
    assert heads == ["score"]
    _save(model, method, path, tmp_path / "adapter", heads)
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(load(tmp_path / "adapter").model(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind,method_name,pooling",
    [("gpt2", "prompt", "auto"), ("llama", "ptuning", "auto"), ("gpt2", "prompt", "mean")]
    + [("bert", "prefix", "mean"), ("bert", "prefix", "last"), ("bert", "ptuning", "last")],
)
def test_virtual_tokens_pool_each_rows_own_tokens(tiny_model_dir, tmp_path, kind, method_name, pooling):
    """Prompt/p-tuning feed decoders inputs_embeds (their head cannot find the padding there); prefix tuning hands
    the body a mask longer than its tokens (it covers the key/value prefix): either way a row was pooled from
    pads when batched with longer rows. Its logits must not depend on its batch, before and after reloading."""
    path = tiny_model_dir(kind)
    model, method, batch, heads, _ = _trained(path, method_name, pooling)
    _save(model, method, path, tmp_path / "adapter", heads)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
    for scored in (model, load(tmp_path / "adapter").model):
        with torch.no_grad():
            alone = torch.cat([scored(**tokenizer([text], return_tensors="pt")).logits for text in TEXTS])
            torch.testing.assert_close(scored(**batch).logits, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ctrl", "modernbert-decoder"])
@pytest.mark.parametrize("method_name", ["lora", "prompt"])
def test_a_decoder_head_named_classifier_reads_each_rows_last_token(tiny_model_dir, kind, method_name):
    """CTRL's and ModernBERT-decoder's heads find the last token by the pad id, as GPT-2's `score` does, but are
    named `classifier`: taken for [CLS] heads, they kept the folder's pad id (1; the batches pad with 0) and read
    virtual tokens' rows at the last position, a pad for the shorter rows: a row's logits depended on its batch."""
    from peftkit.adapters import get_method_class
    from peftkit.pooling import pooling_of

    path = str(tiny_model_dir(kind, pad_token_id=1))
    cfg = ModelConfig(name_or_path=path)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, len(LABELS), tokenizer.pad_token_id)
    assert pooling_of(model) == "last"
    options = get_method_class(method_name).options_class(
        **({"target_modules": ["all-linear"]} if method_name == "lora" else {})
    )
    model = build_method(method_name, options).apply(model, MethodContext(path, trained_head_modules(model), 10))
    with torch.no_grad():
        together = model.eval()(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
        alone = torch.cat([model(**tokenizer([text], return_tensors="pt")).logits for text in TEXTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def _sentence_transformers_copy(src, dst, mode_key="pooling_mode_mean_tokens"):
    shutil.copytree(src, dst)
    (dst / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, mode_key: True}))
    return dst


def test_decoder_head_looks_for_the_pad_the_batches_carry(tiny_model_dir, tmp_path):
    """A Llama-2-style folder declares pad id 0 but its tokenizer has none (peftkit pads with eos): the head must
    look for eos, else it reads a pad for the shorter rows; save_pretrained (a merged export) records that id."""
    from peftkit.modeling import head_pad_token_id

    folder = tmp_path / "llama-2-style"
    shutil.copytree(tiny_model_dir("llama"), folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": None, "eos_token": "[SEP]"}))
    cfg = ModelConfig(name_or_path=str(folder))
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, len(LABELS), tokenizer.pad_token_id).eval()
    with torch.no_grad():
        together = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
        alone = torch.cat([model(**tokenizer([text], return_tensors="pt")).logits for text in TEXTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["pad_token_id"] == head_pad_token_id(model) == tokenizer.pad_token_id != 0


def test_auto_reads_the_base_folder(tiny_model_dir, tmp_path, monkeypatch):
    import peftkit.pooling as pooling
    from peftkit.pooling import pooling_of

    def auto(path):
        return pooling_of(load_model(ModelConfig(name_or_path=str(path)), 2, 0))

    st_mean = _sentence_transformers_copy(tiny_model_dir("bert"), tmp_path / "st-mean")
    st_cls = _sentence_transformers_copy(tiny_model_dir("bert"), tmp_path / "st-cls", "pooling_mode_cls_token")
    monkeypatch.setattr(pooling, "PREFER_POOLER", False)
    assert auto(st_mean) == "mean" and auto(st_cls) == "cls"
    monkeypatch.setattr(pooling, "PREFER_POOLER", True)  # the measured default decides for models with a pooler
    assert auto(st_mean) == "pooler"
    assert auto(tiny_model_dir("bert")) == "pooler"
    assert auto(tiny_model_dir("gpt2")) == "last"
    assert auto(tiny_model_dir("llama")) == "last"
    # `pooler` is the stock class's pooling: without a pooler, the head's own token (so old adapters load everywhere)
    gpt2 = ModelConfig(name_or_path=str(tiny_model_dir("gpt2")), pooling="pooler")
    assert pooling_of(load_model(gpt2, 2, 0)) == "last"


def test_auto_under_a_frozen_body_takes_the_sentence_transformers_pooling(tiny_model_dir, tmp_path):
    from peftkit.adapters import build_method
    from peftkit.pooling import pooling_of

    st_mean = _sentence_transformers_copy(tiny_model_dir("bert"), tmp_path / "st-mean")
    assert build_method("head").frozen_body and not build_method("lora").frozen_body
    for path, frozen, expected in [
        (st_mean, True, "mean"),
        (st_mean, False, "pooler"),
        (tiny_model_dir("bert"), True, "pooler"),
    ]:
        model = load_model(ModelConfig(name_or_path=str(path)), 2, 0, frozen_body=frozen)
        assert pooling_of(model) == expected, (path.name, frozen)


def test_stock_peft_loads_pooler_adapters_and_three_lines_apply_mean(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    path = tiny_model_dir("bert")
    for pooling in ("pooler", "mean"):
        model, method, batch, heads, _ = _trained(path, "lora", pooling)
        _save(model, method, path, tmp_path / pooling, heads)
        base = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=len(LABELS))
        stock = PeftModel.from_pretrained(base, str(tmp_path / pooling)).eval()
        with torch.no_grad():
            expected = model(**batch).logits
            if pooling == "pooler":
                assert torch.equal(stock(**batch).logits, expected)
                continue
            # the README's three lines for mean pooling in plain transformers + peft
            inner = stock.get_base_model()
            h, m = inner.bert(**batch).last_hidden_state, batch["attention_mask"].unsqueeze(-1).float()
            logits = inner.classifier((h * m).sum(1) / m.sum(1))
            torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-5)


def test_full_model_saved_with_mean_pooling_records_and_reapplies_it(tiny_model_dir, tmp_path):
    """save_pretrained writes the pooling into config.json (older `export --merge` folders are such models; it now
    refuses them, tests/test_export.py); `model.pooling: auto` pools that way again."""
    path = tiny_model_dir("bert")
    model, method, batch, heads, _ = _trained(path, "lora", "mean")
    with torch.no_grad():
        expected = model(**batch).logits
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["peftkit_pooling"] == "mean"
    merged = load_model(ModelConfig(name_or_path=str(tmp_path / "merged")), len(LABELS), 0).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["pooler", "mean"])
def test_head_method_trains_only_the_head(tiny_model_dir, tmp_path, pooling):
    path = tiny_model_dir("bert")
    model, method, batch, heads, grads = _trained(path, "head", pooling)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(tuple(f"{h}." for h in heads)) for n in trainable)
    assert any(n.startswith("bert.pooler.") for n in trainable) == (pooling == "pooler")
    _save(model, method, path, tmp_path / "adapter", heads)
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(load(tmp_path / "adapter").model(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_adapter_files_before_1_2_read_as_the_frozen_pooler(tmp_path):
    data = {
        "format_version": "1.1",
        "method": "lora",
        "base_model": "x",
        "peft_format": True,
        "task": {"name": "t", "label_names": ["a", "b"]},
    }
    meta = AdapterMeta.from_dict(data, tmp_path / "peftkit.json")
    assert meta.pooling == "pooler" and meta.head_modules is None
    assert meta.to_dict()["format_version"] == "1.2"
