"""Every method in the registry, parametrised over `available_methods()` (a method added later is tested without
editing this file): applies to a tiny BERT classifier, trains only what it should, saves and reloads with identical
logits (head included), loads in stock peft, merges where it says it can. Plus the generic `peft` entry."""

from __future__ import annotations

import pytest
import torch
from tiny_runs import TINY_OPTIONS

from peftkit.adapters import MethodContext, available_methods, build_method, get_method_class
from peftkit.artifacts import load, save_adapter
from peftkit.config import ModelConfig, RunConfig
from peftkit.errors import PeftkitError
from peftkit.formats import TaskInfo
from peftkit.modeling import count_parameters, head_modules, load_model

METHODS = available_methods()
# TINY_OPTIONS: defaults sized for real models do not fit the tiny BERT (hidden 32), or need a schedule to prune in.

# Methods that refuse an encoder classifier on purpose, with a PeftkitError naming why.
REFUSE_ENCODERS: set[str] = set()
ENCODER_WEIGHTS = ("attention.self.query.weight", "attention.self.key.weight", "intermediate.dense.weight")


def options_for(name, **extra):
    return get_method_class(name).options_class(**{**TINY_OPTIONS.get(name, {}), **extra})


def build(tiny_model_dir, name, **extra):
    path = str(tiny_model_dir("bert"))
    model = load_model(ModelConfig(path), 2, pad_token_id=0)
    method = build_method(name, options_for(name, **extra))
    return method, method.apply(model, MethodContext(path, head_modules(model), total_steps=10))


def batch():
    generator = torch.Generator().manual_seed(3)
    return torch.randint(1000, 2000, (4, 7), generator=generator), torch.tensor([0, 1, 1, 1])


@pytest.mark.parametrize("name", METHODS)
def test_applies_and_trains_only_what_it_should(name, tiny_model_dir):
    if name in REFUSE_ENCODERS:
        with pytest.raises(PeftkitError) as e:
            build(tiny_model_dir, name)
        assert len(str(e.value)) > 30 and "\n" not in str(e.value)
        return
    _, model = build(tiny_model_dir, name)
    params = count_parameters(model)
    assert 0 < params.trainable <= params.total
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert any("classifier" in n for n in trainable), "the task head must train"
    if name != "full":
        frozen_body = [n for n in named if n.endswith(ENCODER_WEIGHTS) and "modules_to_save" not in n]
        assert frozen_body and not trainable & set(frozen_body), "base weight matrices must stay frozen"
    x, y = batch()
    before = {n: named[n].detach().clone() for n in trainable}
    optimizer = torch.optim.AdamW([named[n] for n in trainable], lr=1e-2)
    model.eval()  # dropout off: the loss on one batch must fall step by step (gradients flow in eval mode too)
    losses = []
    for _ in range(8):
        out = model(input_ids=x, labels=y)
        out.loss.backward()
        for n, p in named.items():
            if not p.requires_grad:
                assert p.grad is None, f"frozen {n} got a gradient"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses
    changed = [n for n in trainable if "classifier" not in n and not torch.equal(before[n], named[n])]
    assert changed or all("classifier" in n for n in trainable), "the method's own weights must train"


@pytest.mark.parametrize("name", [m for m in METHODS if m not in REFUSE_ENCODERS])
def test_save_reload_identical_logits_head_saved_stock_peft_and_merge(name, tiny_model_dir, tmp_path):
    method, model = build(tiny_model_dir, name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: move every trainable weight, the head included
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.eval()
    x, _ = batch()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    base = str(tiny_model_dir("bert"))
    save_adapter(model, method, tmp_path / "a", base_model=base, task=TaskInfo(name="toy", label_names=["neg", "pos"]))
    loaded = load(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)

    from safetensors import safe_open

    weights = "adapter_model.safetensors" if method.uses_peft else "peftkit_weights.safetensors"
    with safe_open(str(tmp_path / "a" / weights), framework="pt") as f:
        assert any("classifier" in k for k in f.keys()), "the head must be saved"  # noqa: SIM118 (not a mapping)
    if method.uses_peft and not method.stock_peft_blocker:
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        stock = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(base, num_labels=2), str(tmp_path / "a")
        ).eval()
        with torch.no_grad():
            assert torch.equal(stock(input_ids=x).logits, expected)
    if method.merge_blocker is None and name != "peft":
        merged = method.merge(loaded.model)
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=x).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [m for m in METHODS if m not in REFUSE_ENCODERS and m != "adalora"])
def test_trains_in_the_loop_and_reloads_to_its_numbers(name, tiny_run_config, tmp_path):
    from peftkit.data import encode, load_task
    from peftkit.inference import evaluate
    from peftkit.loop import train

    config = tiny_run_config(name, method_options=TINY_OPTIONS.get(name), seed=7, max_steps=3)
    summary = train(config, run_dir=tmp_path / "run")
    assert summary.trainable_params > 0
    loaded = load(tmp_path / "run" / "adapter")
    split = encode(load_task(config.task).splits["validation"], loaded.tokenizer, 32)
    metrics = evaluate(loaded.model, split, 2, 64, torch.device("cpu"))
    assert metrics["loss"] == pytest.approx(summary.best["loss"], abs=1e-6)


# --------------------------------------------------------------------------------------------- the generic entry


def test_generic_peft_entry_applies_any_type_and_round_trips(tiny_model_dir, tmp_path):
    method, model = build(tiny_model_dir, "peft", peft_type="vera", options={"r": 16, "target_modules": ["query"]})
    assert model.peft_config["default"].peft_type.value == "VERA"
    assert model.peft_config["default"].r == 16
    assert "classifier" in model.peft_config["default"].modules_to_save
    save_adapter(
        model,
        method,
        tmp_path / "a",
        base_model=str(tiny_model_dir("bert")),
        task=TaskInfo(name="toy", label_names=["n", "p"]),
    )
    assert load(tmp_path / "a").method.options.peft_type == "VERA"


def test_generic_peft_entry_from_a_config(tiny_run_config, tmp_path):
    from peftkit.loop import train

    config = tiny_run_config("peft", method_options={"peft_type": "LOHA", "options": {"r": 2}}, max_steps=2)
    assert config.method.options.options == {"r": 2}
    train(config, run_dir=tmp_path / "run")
    assert load(tmp_path / "run" / "adapter").model.peft_config["default"].r == 2


@pytest.mark.parametrize(
    "options, fragments",
    [
        ({"peft_type": "VERAA"}, ["unknown method.peft_type 'VERAA'", "Did you mean 'VERA'", "LOHA"]),
        ({"peft_type": "VERA", "options": {"rank": 4}}, ["unknown option of VeraConfig", "'rank'", "d_initial"]),
        ({"peft_type": "ADAPTION_PROMPT"}, ["cannot work on an encoder classifier", "decoder"]),
        ({"peft_type": "ADALORA"}, ["use method.name=adalora"]),
        ({"peft_type": "VERA", "options": [1, 2]}, ["must be a mapping"]),
    ],
)
def test_generic_peft_entry_errors_name_the_problem(options, fragments):
    with pytest.raises(PeftkitError) as e:
        RunConfig.from_dict({"method": {"name": "peft", **options}})
    for fragment in fragments:
        assert fragment in str(e.value)


def test_generic_peft_entry_turns_peft_value_errors_into_one_line(tiny_model_dir):
    with pytest.raises(PeftkitError, match="peft cannot apply MISS"):
        build(tiny_model_dir, "peft", peft_type="MISS", options={"r": 64})  # r above the tiny layers' width


def test_methods_command_lists_unsupported_peft_types(capsys):
    from peftkit.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("vera", "loha", "lokr", "oft", "boft", "hra", "fourierft", "ln_tuning", "miss", "peft"):
        assert f"\n{name} " in out
    assert "ADAPTION_PROMPT" in out and "cannot work on an encoder classifier" in out


# --------------------------------------------------------------------------------------------- LoRA's variants


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa", "olora", "eva"])
def test_lora_inits_train_and_the_saved_folder_reloads_on_the_original_base(init, tiny_run_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftkit.data import encode, load_task
    from peftkit.inference import evaluate
    from peftkit.loop import train

    options = {"init": init, "r": 4, "calibration_batches": 2}
    config = tiny_run_config("lora", method_options=options, seed=3, max_steps=4, eval_every=None)
    summary = train(config, run_dir=tmp_path / "run")
    adapter = tmp_path / "run" / "adapter"
    loaded = load(adapter)  # onto the unmodified base: PiSSA/OLoRA/CorDA were converted to a plain LoRA on save
    split = encode(load_task(config.task).splits["validation"], loaded.tokenizer, 32)
    metrics = evaluate(loaded.model, split, 2, 64, torch.device("cpu"))
    assert metrics["loss"] == pytest.approx(summary.best["loss"], abs=1e-4)
    saved = loaded.model.peft_config["default"]
    if init in ("pissa", "olora", "corda"):  # converted on save: rank 2r, an ordinary LoRA
        assert saved.init_lora_weights is True and saved.r == 8
    base = AutoModelForSequenceClassification.from_pretrained(config.model.name_or_path, num_labels=2)
    stock = PeftModel.from_pretrained(base, str(adapter)).eval()
    x = torch.randint(1000, 2000, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=x).logits, loaded.model(input_ids=x).logits)


def test_lora_init_changes_the_starting_point(tiny_model_dir):
    _, default = build(tiny_model_dir, "lora", r=4)
    _, pissa = build(tiny_model_dir, "lora", r=4, init="pissa")
    name = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"
    assert torch.count_nonzero(dict(default.named_parameters())[name]) == 0
    assert torch.count_nonzero(dict(pissa.named_parameters())[name]) > 0


def test_lora_rslora_and_all_linear(tiny_model_dir):
    _, model = build(tiny_model_dir, "lora", r=4, alpha=8, use_rslora=True, target_modules=["all-linear"])
    layer = model.base_model.model.bert.encoder.layer[0]
    assert layer.attention.self.query.scaling["default"] == pytest.approx(8 / 4**0.5)
    for module in (layer.attention.self.key, layer.intermediate.dense, layer.output.dense):
        assert "default" in module.lora_A, "all-linear targets every linear layer of the body"
    assert not hasattr(model.base_model.model.classifier, "lora_A")


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"init": "loftq"}, "modified base to be shipped"),
        ({"init": "corda"}, "fails inside peft 0.21.2's preprocess_corda"),
        ({"init": "pisa"}, "Did you mean 'pissa'"),
    ],
)
def test_lora_init_errors_name_the_reason(options, fragment):
    with pytest.raises(PeftkitError, match=fragment):
        RunConfig.from_dict({"method": {"name": "lora", **options}})


def test_lora_data_inits_need_training_batches(tiny_model_dir):
    with pytest.raises(PeftkitError, match="reads layer inputs from training batches"):
        build(tiny_model_dir, "lora", init="eva")


def test_prefix_on_bert_loads_in_stock_peft_after_the_rename(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftkit.adapters.prefix import accept_past_key_values

    method, model = build(tiny_model_dir, "prefix", num_virtual_tokens=4)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.add_(1.0)
    model.eval()
    x, _ = batch()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    save_adapter(
        model,
        method,
        tmp_path / "a",
        base_model=str(tiny_model_dir("bert")),
        task=TaskInfo(name="toy", label_names=["n", "p"]),
    )
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir("bert")), num_labels=2)
    stock = PeftModel.from_pretrained(accept_past_key_values(base), str(tmp_path / "a")).eval()
    with torch.no_grad():
        assert torch.equal(stock(input_ids=x).logits, expected)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prefix_on_decoders_is_a_clear_error(kind, tiny_model_dir):
    path = str(tiny_model_dir(kind))
    model = load_model(ModelConfig(path), 2, pad_token_id=0)
    with pytest.raises(PeftkitError, match="Use method prompt or ptuning"):
        build_method("prefix").apply(model, MethodContext(path, head_modules(model)))


@pytest.mark.parametrize("name", [m for m in METHODS if m not in REFUSE_ENCODERS])
def test_served_beside_a_lora_adapter_matches_loading_it_alone(name, tiny_model_dir, tmp_path):
    """The multi-adapter server: LoRA adapters share a mixed batch, every other method gets its own grouped pass."""
    from tiny_runs import TEXTS, logits_of

    from peftkit.serve import AdapterPool

    folders = {}
    for label, method_name in (("own", name), ("lora", "lora")):
        method, model = build(tiny_model_dir, method_name)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))
        save_adapter(
            model,
            method,
            tmp_path / label,
            base_model=str(tiny_model_dir("bert")),
            task=TaskInfo(name="toy", label_names=["neg", "pos"], max_length=32),
        )
        folders[label] = tmp_path / label
    pool = AdapterPool(str(tiny_model_dir("bert")))
    for label, folder in folders.items():
        pool.add(label, folder)
    results = pool.predict([(label, TEXTS, None) for label in folders])
    for folder, predictions in zip(folders.values(), results):
        loaded = load(folder)
        want = torch.softmax(logits_of(loaded.model, loaded.tokenizer), -1)
        got = torch.tensor([list(p["probabilities"].values()) for p in predictions])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
