"""Every method applies, trains only what it should, counts like the formula says, and round-trips exactly."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import ADALORA_TINY, TEXTS, TINY_OPTIONS

from peftkit.adapters import MethodContext, available_methods, build_method
from peftkit.adapters import apply_method as apply_clearly
from peftkit.artifacts import load
from peftkit.config import ModelConfig
from peftkit.data import encode, load_task
from peftkit.errors import PeftkitError
from peftkit.loop import train
from peftkit.modeling import count_parameters, head_modules, load_model, trained_head_modules

H, L, FF, LABELS = 32, 2, 64, 2  # the tiny BERT of conftest
HEAD = H * LABELS + LABELS


def apply_method(tiny_model_dir, name, kind="bert", **options):
    from peftkit.adapters import get_method_class

    model = load_model(ModelConfig(str(tiny_model_dir(kind))), LABELS, pad_token_id=0)
    method = build_method(name, get_method_class(name).options_class(**options))
    ctx = MethodContext(str(tiny_model_dir(kind)), head_modules(model), total_steps=10)
    return apply_clearly(method, model, ctx)  # as the loop does: a library's refusal in one line


def trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("lora", {"r": 4, "target_modules": ["query", "value"]}, L * 2 * 4 * (H + H) + HEAD),
        (
            "dora",
            {"r": 4, "target_modules": ["query", "value"]},
            L * 2 * (4 * (H + H) + H) + HEAD,
        ),  # + magnitude vector
        ("bottleneck", {"placement": "houlsby", "reduction_factor": 16}, L * 2 * ((H * 2 + 2) + (2 * H + H)) + HEAD),
        ("bottleneck", {"placement": "pfeiffer", "reduction_factor": 16}, L * ((H * 2 + 2) + (2 * H + H)) + HEAD),
        ("bottleneck", {"bottleneck_size": 8}, L * 2 * ((H * 8 + 8) + (8 * H + H)) + HEAD),
        ("prompt", {"num_virtual_tokens": 20}, 20 * H + HEAD),
        # IA3 on BERT (peft's default): key and value scale their H outputs; "output.dense" matches both the attention
        # output (H inputs) and the feed-forward output (FF inputs), both treated as feed-forward, scaled on the input
        ("ia3", {}, L * (H + H + H + FF) + HEAD),
        # BitFit: embeddings LN + per layer (q,k,v, attn out, attn LN, intermediate, out, out LN) + pooler + head
        ("bitfit", {}, H + L * (3 * H + H + H + FF + H + H) + H + HEAD),
    ],
)
def test_trainable_count_matches_formula(tiny_model_dir, name, options, expected):
    model = apply_method(tiny_model_dir, name, **options)
    assert count_parameters(model).trainable == expected


@pytest.mark.parametrize(
    "name, allowed",
    [
        ("lora", ("lora_", "classifier")),
        ("bottleneck", ("bottleneck_adapter", "classifier")),
        ("bitfit", (".bias", "classifier")),
        ("ia3", ("ia3_l", "classifier")),
        ("prompt", ("prompt_encoder", "classifier")),
        ("ptuning", ("prompt_encoder", "classifier")),
        ("adalora", ("lora_", "classifier")),
    ],
)
def test_only_intended_parameters_get_gradients(tiny_model_dir, name, allowed):
    options = {"tinit_ratio": 0.0, "tfinal_ratio": 0.0} if name == "adalora" else {}
    model = apply_method(tiny_model_dir, name, **options)
    names = trainable_names(model)
    assert names and all(any(a in n for a in allowed) for n in names), names
    assert any("classifier" in n for n in names), "the task head must train"
    out = model(input_ids=torch.randint(1000, 2000, (2, 6)), labels=torch.tensor([0, 1]))
    out.loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


def test_full_trains_everything(tiny_model_dir):
    model = apply_method(tiny_model_dir, "full")
    assert count_parameters(model).trainable == count_parameters(model).total


def apply_or_skip(tiny_model_dir, method, kind="bert", **options):
    """Apply a registered method to a tiny model; a method that cannot run there must say why in one line."""
    try:
        return apply_method(tiny_model_dir, method, kind, **options)
    except PeftkitError as e:
        assert "\n" not in str(e) and len(str(e)) > 20
        pytest.skip(f"{method} does not apply to a {kind} classifier: {e}")


def move_trainable(model):
    """Stand-in for training: move every trainable weight, the head included."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("method", available_methods())  # the registry: a new method is tested without edits here
def test_save_load_round_trip_gives_identical_logits(method, tiny_model_dir, tmp_path):
    from peftkit.artifacts import save_adapter
    from peftkit.formats import TaskInfo

    options = TINY_OPTIONS.get(method, {})
    model = move_trainable(apply_or_skip(tiny_model_dir, method, **options))
    x = torch.randint(1000, 2000, (3, 7))
    expected = model(input_ids=x).logits
    save_adapter(
        model,
        build_method(method, model_options(method, options)),
        tmp_path / "a",
        base_model=str(tiny_model_dir("bert")),
        task=TaskInfo(name="toy", label_names=["neg", "pos"]),
    )
    loaded = load(tmp_path / "a")
    torch.testing.assert_close(loaded.model(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)


ALL_LINEAR = {"target_modules": ["all-linear"]}  # peft has no default targets for some of these architectures


@pytest.mark.parametrize(
    "kind, method, options",
    [
        *(("distilbert", m, {}) for m in ("head", "bitfit", "bottleneck")),
        ("distilbert", "lora", ALL_LINEAR),  # all-linear must leave pre_classifier to the head
        ("deberta-v2", "head", {}),
        ("deberta-v2", "lora", {}),
        ("modernbert", "head", {}),
        ("modernbert", "boft", ALL_LINEAR),
        ("roberta", "ia3", {}),
        ("roberta", "oft", {}),
    ],
)
def test_head_layers_beside_the_classifier_train_ship_and_merge(kind, method, options, tiny_model_dir, tmp_path):
    """Every child outside the body is head: DistilBERT's pre_classifier, DeBERTa-v2's pooler and ModernBERT's head
    were neither trained nor saved, so a load (seeded unlike the run) made them random again; and the wrapper of a
    composite head (RoBERTa's dense + out_proj) broke the merge of IA3, OFT and the like."""
    from peftkit.artifacts import save_adapter
    from peftkit.formats import TaskInfo

    path = str(tiny_model_dir(kind))
    model = load_model(ModelConfig(path), LABELS, pad_token_id=0, seed=7)  # train.seed=7; a load uses 0
    heads = trained_head_modules(model)
    method_obj = build_method(method, model_options(method, options))
    model = move_trainable(apply_clearly(method_obj, model, MethodContext(path, heads)))
    x = torch.randint(1000, 2000, (3, 7))
    expected = model(input_ids=x).logits
    task = TaskInfo(name="toy", label_names=["neg", "pos"])
    save_adapter(model, method_obj, tmp_path / "a", base_model=path, task=task, head_modules=heads)
    loaded = load(tmp_path / "a")
    torch.testing.assert_close(loaded.model(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.merged().model(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)


VIRTUAL_TOKENS_THROUGH_PEFT = ("peft", {"peft_type": "P_TUNING", "options": {"num_virtual_tokens": 4}})
DECODER_NORMS = {"gpt2": ["ln_1", "ln_2"], "llama": ["input_layernorm", "post_attention_layernorm"]}


def on(kind, method, options):
    """A method's options for a `kind` model: on decoders, BERT-named default targets become theirs."""
    from peftkit.adapters import get_method_class

    if kind == "bert" or not getattr(get_method_class(method).options_class(), "target_modules", None):
        return options
    return {"target_modules": DECODER_NORMS[kind] if method == "ln_tuning" else ["all-linear"], **options}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize(
    "method, options", [*((m, TINY_OPTIONS.get(m, {})) for m in available_methods()), VIRTUAL_TOKENS_THROUGH_PEFT]
)
def test_a_rows_logits_do_not_depend_on_its_batch(method, options, kind, tiny_model_dir):
    """Virtual tokens (prompt, ptuning) reach a decoder as inputs_embeds, in which its head finds no padding: it
    read the last position, a pad for the shorter rows of a right-padded batch. Eval, predict and the training
    loss must read each row's own last token, whatever rows share its batch."""
    from peftkit.data import collate
    from peftkit.inference import predict_logits
    from peftkit.modeling import load_tokenizer

    model = move_trainable(apply_or_skip(tiny_model_dir, method, kind, **on(kind, method, options)))
    tokenizer = load_tokenizer(ModelConfig(str(tiny_model_dir(kind))))
    split = encode([{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)], tokenizer, 32)
    alone = predict_logits(model, split, 1, torch.device("cpu"))
    batched = predict_logits(model, split, len(TEXTS), torch.device("cpu"))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    rows = list(range(len(TEXTS)))
    with torch.no_grad():  # the loss the loop trains on (AdaLoRA's regulariser included) reads the same tokens
        out = model(**collate(split, rows))
        losses_alone = [model(**collate(split, [i])).loss for i in rows]
    torch.testing.assert_close(out.logits, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, torch.stack(losses_alone).mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_peft_save_and_key_check_never_ask_the_hub(method, tiny_model_dir, tmp_path, monkeypatch):
    """A base named by a Hub id (as every run of the default model is): saving an adapter, and checking a saved
    one's tensors before loading it, must not reach for the network."""
    import peft.utils.save_and_load as peft_save

    from peftkit.artifacts import check_peft_keys

    def no_network(*args, **kwargs):
        raise AssertionError("peft asked the Hub")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_network)
    options = TINY_OPTIONS.get(method, {})
    model = apply_method(tiny_model_dir, method, **options)
    model.peft_config["default"].base_model_name_or_path = "someone/a-hub-model"
    build_method(method, model_options(method, options)).save(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").stat().st_size > 0
    check_peft_keys(model, tmp_path)


def model_options(name, options):
    from peftkit.adapters import get_method_class

    return get_method_class(name).options_class(**options)


@pytest.mark.parametrize("method", available_methods())
def test_trained_adapter_reloads_to_the_loops_own_validation_numbers(
    method, tiny_model_dir, tiny_run_config, tmp_path
):
    """After real training (AdaLoRA's rank pruning included) the shipped folder reproduces the kept model."""
    from peftkit.inference import evaluate

    apply_or_skip(tiny_model_dir, method, **TINY_OPTIONS.get(method, {}))
    config = tiny_run_config(
        method, method_options=ADALORA_TINY if method == "adalora" else TINY_OPTIONS.get(method), seed=7, max_steps=6
    )
    summary = train(config, run_dir=tmp_path / "run")
    loaded = load(tmp_path / "run" / "adapter")
    split = encode(load_task(config.task).splits["validation"], loaded.tokenizer, 32)
    metrics = evaluate(loaded.model, split, 2, 64, torch.device("cpu"))
    assert metrics["loss"] == pytest.approx(summary.best["loss"], abs=1e-6)
    assert metrics["accuracy"] == summary.best["accuracy"]


def test_adalora_reallocates_rank_budget(tiny_run_config, tmp_path):
    config = tiny_run_config("adalora", method_options=ADALORA_TINY, max_steps=8)
    train(config, run_dir=tmp_path / "run")
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    pattern = adapter_config["rank_pattern"]
    assert pattern, "update_and_allocate never ran: no rank pattern"
    kept = [sum(mask) for mask in pattern.values()]
    assert sum(kept) == 2 * len(kept)  # budget = target_r per module on average
    assert min(kept) < 4  # some module lost rank from init_r=4


def test_adalora_logs_regulariser_separately(tiny_run_config, tmp_path):
    train(tiny_run_config("adalora", method_options=ADALORA_TINY), run_dir=tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "task_loss" in r]
    assert steps and all(r["regulariser"] > 0 for r in steps)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["adapter", "lora", "ia3", "prompt"])
def test_decoders_train_and_round_trip(kind, method, tiny_run_config, tmp_path):
    config = tiny_run_config(method, kind, seed=3)
    summary = train(config, run_dir=tmp_path / "run")
    assert summary.trainable_params > 0
    loaded = load(tmp_path / "run" / "adapter")
    assert loaded.model.config.model_type == kind


def test_bitfit_on_llama_without_biases_is_a_clear_error(tiny_model_dir):
    with pytest.raises(PeftkitError, match="no bias"):
        apply_method(tiny_model_dir, "bitfit", kind="llama")


def test_adapter_on_unknown_architecture_names_supported(tiny_model_dir):
    model = load_model(ModelConfig(str(tiny_model_dir("bert"))), 2, 0)
    model.config.model_type = "mystery"
    with pytest.raises(PeftkitError, match="supported: .*bert.*gpt2.*llama"):
        build_method("adapter").apply(model, MethodContext("x", ["classifier"]))


def test_adapter_starts_as_identity(tiny_model_dir):
    base = load_model(ModelConfig(str(tiny_model_dir("bert"))), 2, 0).eval()
    x = torch.randint(1000, 2000, (2, 6))
    before = base(input_ids=x).logits
    adapted = build_method("adapter").apply(base, MethodContext("x", ["classifier"]))
    assert torch.equal(before, adapted(input_ids=x).logits)


@pytest.mark.parametrize(
    "method, targets, named",
    [
        ("lora", ["query", "value"], "['query', 'value']"),
        ("adalora", ["query", "value"], "['query', 'value']"),
        ("vera", ["c_attn", "value"], "['value']"),  # a name that does match does not hide the one that does not
        ("ln_tuning", ["LayerNorm"], "['LayerNorm']"),
    ],
)
def test_target_modules_a_decoder_lacks_are_named_with_the_ones_it_has(tiny_model_dir, method, targets, named):
    """The recipes' BERT names on GPT-2: one line naming what matched nothing, GPT-2's own names and the fix."""
    with pytest.raises(PeftkitError) as e:
        apply_method(tiny_model_dir, method, "gpt2", target_modules=targets, **TINY_OPTIONS.get(method, {}))
    message = str(e.value)
    assert "\n" not in message and f"target_modules {named} match no module" in message
    if method == "ln_tuning":
        assert "norm modules are named ln_1, ln_2, ln_f" in message and "all-linear" not in message
    else:
        assert "linear modules are named c_attn, c_proj, c_fc" in message and "score" not in message
        assert "method.target_modules=all-linear" in message


def test_ln_tuning_refuses_all_linear(tiny_model_dir):
    """peft would accept it and fully train every linear layer: a different method under LN-tuning's name."""
    with pytest.raises(PeftkitError, match="tunes norm layers.*norm modules are named LayerNorm"):
        apply_method(tiny_model_dir, "ln_tuning", target_modules=["all-linear"])


def test_the_generic_peft_methods_hint_names_its_own_setting(tiny_model_dir):
    with pytest.raises(PeftkitError) as e:
        apply_method(tiny_model_dir, "peft", "gpt2", peft_type="LORA", options={"target_modules": ["query"]})
    assert "Set method.options={target_modules: all-linear}, or method.options' target_modules to" in str(e.value)


@pytest.mark.parametrize("method", ["adalora", "vera", "loha"])
def test_all_linear_targets_every_linear_layer_for_every_method(tiny_model_dir, method):
    model = apply_method(tiny_model_dir, method, target_modules=["all-linear"], **TINY_OPTIONS.get(method, {}))
    adapted = {n.rsplit(".", 1)[-1] for n in model.peft_config["default"].target_modules}
    assert adapted == {"query", "key", "value", "dense"}, adapted  # every linear layer but the classifier


def test_a_layer_type_the_tuner_cannot_adapt_is_one_line(tiny_model_dir):
    with pytest.raises(PeftkitError, match=r"'boft' could not be applied .*TypeError: Target module Conv1D"):
        apply_method(tiny_model_dir, "boft", "gpt2", target_modules=["all-linear"])  # GPT-2's layers are Conv1D


def test_prefix_on_decoders_is_a_clear_error_not_a_forward_crash(tiny_model_dir):
    # BERT-likes train since peftkit renames their backbone's `cache` argument (tests/test_tuners.py)
    with pytest.raises(PeftkitError, match="past_key_values.*prompt or ptuning"):
        apply_method(tiny_model_dir, "prefix", kind="gpt2")


def test_unknown_method_suggests_close_match():
    from peftkit.adapters import get_method_class

    with pytest.raises(PeftkitError, match="'lora'"):
        get_method_class("lorra")
    assert {"full", "bitfit", "bottleneck", "lora", "dora", "adalora", "ia3", "prompt", "ptuning", "prefix"} <= set(
        available_methods()
    )


def test_third_party_method_registers_through_entry_point(tmp_path, monkeypatch, tiny_model_dir):
    """A plugin package declares `[project.entry-points."peftkit.methods"]`; peftkit finds it by name."""
    (tmp_path / "myplugin.py").write_text(
        "from dataclasses import dataclass\n"
        "from peftkit.adapters.base import Method, freeze, unfreeze_head\n"
        "@dataclass\nclass HeadOnlyConfig:\n    pass\n"
        "class HeadOnly(Method):\n    name = 'headonly'\n    options_class = HeadOnlyConfig\n"
        "    def apply(self, model, ctx):\n"
        "        freeze(model); unfreeze_head(model, ctx.head_modules); return model\n"
    )
    install_plugin(tmp_path, monkeypatch, "headonly = myplugin:HeadOnly")
    assert "headonly" in available_methods()
    model = apply_method(tiny_model_dir, "headonly")
    assert count_parameters(model).trainable == HEAD


def install_plugin(tmp_path, monkeypatch, entry_point: str) -> None:
    """What `pip install` of a plugin leaves behind: a dist-info whose entry_points.txt names `entry_point`."""
    dist = tmp_path / "myplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[peftkit.methods]\n{entry_point}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize(
    "module, target, fragment",
    [
        ("import no_such_module_xyz\n", "brokenplugin:Thing", "ModuleNotFoundError: No module named"),
        ("Thing = 3\n", "brokenplugin:Thing", "is 3, not a peftkit.adapters.Method subclass"),
        ("", "brokenplugin:Missing", "AttributeError"),
    ],
)
def test_a_broken_plugin_is_one_line_and_methods_still_lists_the_rest(
    tmp_path, monkeypatch, capsys, module, target, fragment
):
    """A plugin that fails to import was a traceback out of `peftkit methods` and `train method.name=...`."""
    from peftkit.cli import main

    (tmp_path / "brokenplugin.py").write_text(module)
    install_plugin(tmp_path, monkeypatch, f"broken = {target}")
    assert main(["train", "sst2-lora", "method.name=broken", "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "third-party method 'broken'" in error and fragment in error
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "\nbroken " in out and "cannot be used" in out and "\nlora " in out


@pytest.mark.parametrize("kind", ["electra-small-embed", "distilbert"])
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_virtual_tokens_take_the_input_embedding_width(tiny_model_dir, kind, method):
    """peft sized them by hidden_size (32 on ELECTRA, whose embeddings are 16 wide: a shape error in the forward)
    and found no hidden_size at all in DistilBERT's config.json (dim, n_layers, n_heads)."""
    model = apply_method(tiny_model_dir, method, kind, num_virtual_tokens=4)
    assert model.peft_config["default"].token_dim == model.get_input_embeddings().embedding_dim
    assert model(input_ids=torch.randint(1000, 2000, (2, 5))).logits.shape == (2, LABELS)


def test_ia3_all_linear_scales_the_inputs_of_the_down_projections(tiny_model_dir):
    """peft has no IA3 feed-forward table for ELECTRA ("Please specify `feedforward_modules`"): the layers that
    narrow (FFN out, 64 -> 32) scale their input, as peft's tables do for BERT, GPT-2 and Llama."""
    model = apply_method(tiny_model_dir, "ia3", "electra-small-embed", target_modules=["all-linear"])
    feedforward = {n for n, m in model.named_modules() if getattr(m, "is_feedforward", False)}
    assert feedforward == {f"base_model.model.electra.encoder.layer.{i}.output.dense" for i in range(L)}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_ia3_all_linear_on_a_model_in_peft_s_table_saves_an_adapter_that_loads(tiny_run_config, tmp_path, kind):
    """peft saved all-linear's targets as full names and its table's feed-forward entries as suffixes
    ('output.dense'), then refused its own folder on load (not a subset): export, eval and predict all failed."""
    train(tiny_run_config("ia3", kind, method_options={"target_modules": ["all-linear"]}), run_dir=tmp_path / "run")
    model = load(tmp_path / "run" / "adapter").model
    feedforward = {n for n, m in model.named_modules() if getattr(m, "is_feedforward", False)}
    # peft's table, matched as peft matches: BERT's 'output.dense' is also the attention's output.dense
    bert = {f"bert.encoder.layer.{i}.{part}output.dense" for i in range(L) for part in ("", "attention.")}
    gpt2 = {f"transformer.h.{i}.mlp.c_proj" for i in range(L)}
    assert {n.removeprefix("base_model.model.") for n in feedforward} == (gpt2 if kind == "gpt2" else bert)


@pytest.mark.parametrize("method", ["adalora", "ia3"])
def test_no_default_target_modules_names_the_models_own(tiny_model_dir, method):
    """Where peft has no default targets for the architecture, one line with its linear layers and the fix."""
    with pytest.raises(PeftkitError) as e:
        apply_method(tiny_model_dir, method, "electra-small-embed", **TINY_OPTIONS.get(method, {}))
    message = str(e.value)
    assert "\n" not in message and "no default target_modules for model type 'electra'" in message
    assert "query, key, value, dense" in message and "method.target_modules=all-linear" in message
