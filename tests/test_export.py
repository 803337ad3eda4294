"""Export, merged export, weighted merge, base fingerprints and damaged folders (tiny BERT, a few steps each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_runs import TINY_OPTIONS, TinyRuns, logits_of

from peftkit.adapters import available_methods, get_method_class
from peftkit.artifacts import load
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.export import combine_adapters, export_adapter, export_merged
from peftkit.fingerprint import model_fingerprint
from peftkit.formats import AdapterMeta

ALL_METHODS = ["full", "bitfit", "bottleneck", "lora", "dora", "adalora", "ia3", "prompt", "ptuning"]
PEFT_METHODS = ["lora", "dora", "adalora", "ia3", "prompt", "ptuning"]
PEFT_FORMAT = [m for m in available_methods() if get_method_class(m).uses_peft]  # "peft": its default type, LORA
MERGEABLE = [m for m in available_methods() if get_method_class(m).merge_blocker is None]


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("PEFTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, toy_task_dir) -> TinyRuns:
    return TinyRuns(tmp_path_factory.mktemp("ship"), tiny_model_dir("bert"), toy_task_dir)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, tiny_model_dir) -> Path:
    """Same architecture and tokenizer as the tiny BERT, different random weights."""
    from transformers import AutoConfig, AutoModel

    src = tiny_model_dir("bert")
    out = tmp_path_factory.mktemp("other-bert")
    torch.manual_seed(1)
    AutoModel.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    for f in src.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, out / f.name)
    return out


def base_model(path, num_labels=2, seed=7):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # a different head init than training: the adapter must bring its own head
    return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_export_round_trip_identical_predictions(method, runs, tmp_path):
    run = runs.run(method)
    original = load(run / "adapter")
    out = export_adapter(run, tmp_path / "export")
    meta = AdapterMeta.read(out)
    assert meta.base_fingerprint == model_fingerprint(runs.model_dir)
    assert meta.task.label_names == ["negative", "positive"] and meta.task.text_field == "text"
    card = (out / "README.md").read_text()
    assert method in card and "Trainable parameters" in card and "peftkit.load" in card
    exported = load(out)
    assert torch.equal(logits_of(exported.model, exported.tokenizer), logits_of(original.model, original.tokenizer))
    files = {f.name for f in out.iterdir()}
    if method in PEFT_METHODS:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == meta.base_model
        name = config["base_model_name_or_path"]
        assert ".venv" not in name and "site-packages" not in name
    else:
        assert "peftkit_weights.safetensors" in files and "adapter_config.json" not in files
    assert not any(f.suffix in (".bin", ".pt", ".pkl") for f in out.iterdir())


@pytest.mark.parametrize("method", PEFT_FORMAT)
def test_card_offers_stock_peft_only_where_it_loads_with_identical_logits(method, runs, tmp_path):
    from peft import PeftModel

    run = runs.run(method, **TINY_OPTIONS.get(method, {}))
    out = export_adapter(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    blocker = get_method_class(method).stock_peft_blocker
    if blocker:  # prefix: tests/test_export.py::test_prefix_card_says_what_stock_peft_needs
        assert f"Not as is: {blocker}" in card and "PeftModel" not in card
        return
    assert "model = PeftModel.from_pretrained(base, 'THIS_FOLDER')" in card
    note = get_method_class(method).stock_peft_note  # adalora: peft's false rank_pattern warning, explained
    assert ("Note: peft may warn" in card) == (method == "adalora") and (note is None or note in card)
    ours = load(out)
    stock = PeftModel.from_pretrained(base_model(runs.model_dir), str(out)).eval()
    assert torch.equal(logits_of(stock, ours.tokenizer), logits_of(ours.model, ours.tokenizer))


def test_prefix_card_says_what_stock_peft_needs(runs, tmp_path):
    from peft import PeftModel

    from peftkit.adapters.prefix import accept_past_key_values

    out = export_adapter(runs.run("prefix"), tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "accept_past_key_values(base) first" in card and "PeftModel.from_pretrained" not in card
    ours = load(out)
    with pytest.raises(ValueError, match="past key values"):  # what the card used to offer fails at the forward
        logits_of(PeftModel.from_pretrained(base_model(runs.model_dir), str(out)), ours.tokenizer)
    stock = PeftModel.from_pretrained(accept_past_key_values(base_model(runs.model_dir)), str(out)).eval()
    assert torch.equal(logits_of(stock, ours.tokenizer), logits_of(ours.model, ours.tokenizer))


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_decoder_prompt_card_offers_no_stock_load(method, tmp_path, tiny_model_dir, toy_task_dir):
    """Stock GPT-2 under prompt tuning pools the last position (a pad in a padded batch): no stock-peft promise."""
    runs = TinyRuns(tmp_path, tiny_model_dir("gpt2"), toy_task_dir)
    card = (export_adapter(runs.run(method), tmp_path / "export") / "README.md").read_text()
    assert "Not as is: it pools with 'last'" in card and "PeftModel.from_pretrained" not in card


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_export_matches_adapter_via_plain_transformers(method, runs, tmp_path):
    """Every method that merges, from the registry: ln_tuning saved peft's modules_to_save wrapper keys."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = runs.run(method, **TINY_OPTIONS.get(method, {}))
    adapted = load(run / "adapter")
    expected = logits_of(adapted.model, adapted.tokenizer)
    out = export_merged(run, tmp_path / "merged")
    plain, info = AutoModelForSequenceClassification.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert plain.config.id2label == {0: "negative", 1: "positive"}
    got = logits_of(plain, AutoTokenizer.from_pretrained(str(out)))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not any(f.suffix in (".bin", ".pt", ".pkl") for f in out.iterdir())


def test_merged_export_tokenizer_truncates_at_the_trained_max_length(runs, tmp_path):
    """The merged folder's tokenizer kept the base's 512-token limit: a plain load scored long rows on tokens the
    adapter never saw (training, eval, predict and serve cut at task.max_length)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapted = load(runs.run("lora") / "adapter")
    out = export_merged(runs.run("lora"), tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.model_max_length == adapted.meta.task.max_length == 32
    long_row = [" ".join(["great"] * 80)]
    enc = tokenizer(long_row, truncation=True, return_tensors="pt")
    with torch.no_grad():
        got = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()(**enc).logits
    assert torch.allclose(got, logits_of(adapted.model, adapted.tokenizer, long_row), atol=1e-5)


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean", "last"])
@pytest.mark.parametrize("method", ["head", "lora"])
def test_merge_and_card_offer_stock_loads_only_for_a_pooling_stock_classes_compute(
    method, pooling, runs, tmp_path, capsys
):
    """BERT's class computes only its pooler: any other pooling's merge is refused (transformers would load it with
    an untrained pooler) and its card offers no stock-peft load."""
    from transformers import AutoModelForSequenceClassification

    run = runs.run(method, pooling=pooling)
    card = (export_adapter(run, tmp_path / "adapter") / "README.md").read_text()
    code = main(["export", str(run), "--out", str(tmp_path / "merged"), "--merge"])
    err = capsys.readouterr().err
    if pooling == "pooler":
        assert code == 0 and ("PeftModel.from_pretrained(base" in card) == (method == "lora")
        adapted = load(run / "adapter")
        plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
        got, expected = logits_of(plain, adapted.tokenizer), logits_of(adapted.model, adapted.tokenizer)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        return
    assert code == 2 and not (tmp_path / "merged").exists()
    assert f"pools with {pooling!r}" in err and "without --merge" in err and "model.pooling: pooler" in err
    assert "PeftModel.from_pretrained" not in card
    assert (f"Not as is: it pools with {pooling!r}" in card) == (method == "lora")  # head: peftkit weights only


@pytest.mark.parametrize("method,why", [("prompt", "virtual tokens"), ("bottleneck", "non-linear")])
def test_merge_refused_with_reason(method, why, runs, tmp_path, capsys):
    run = runs.run(method)
    assert main(["export", str(run), "--out", str(tmp_path / "m"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "cannot be merged" in err and why in err and method in err
    assert not (tmp_path / "m").exists()


def test_export_cli_writes_folder(runs, tmp_path, capsys):
    run = runs.run("lora")
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 0
    assert "fingerprint" in capsys.readouterr().out
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 2  # never overwrites silently
    assert "already exists" in capsys.readouterr().err


def test_fingerprint_refuses_other_base_unless_allowed(runs, other_base, tmp_path, capsys):
    out = export_adapter(runs.run("lora"), tmp_path / "e")
    assert model_fingerprint(other_base) != model_fingerprint(runs.model_dir)
    with pytest.raises(PeftkitError, match="allow-base-mismatch") as info:
        load(out, base=str(other_base))
    assert "fingerprint" in str(info.value)
    loaded = load(out, base=str(other_base), allow_base_mismatch=True)
    assert logits_of(loaded.model, loaded.tokenizer).shape == (4, 2)
    # the CLI refuses too, and accepts the expert flag
    (tmp_path / "in.jsonl").write_text('{"text": "great"}\n')
    args = [
        "predict",
        str(out),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "p.jsonl"),
        "--base",
        str(other_base),
    ]
    assert main(args) == 2 and "fingerprint" in capsys.readouterr().err
    assert main(args + ["--allow-base-mismatch"]) == 0


def test_fingerprint_cached_and_hub_ids_skip(runs, monkeypatch, tmp_path):
    import peftkit.fingerprint as fp

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "c"))
    first = model_fingerprint(runs.model_dir)
    calls = []
    monkeypatch.setattr(fp, "_hash_files", lambda files: calls.append(files) or "x")
    assert model_fingerprint(runs.model_dir) == first and not calls  # served from the cache
    assert json.loads((tmp_path / "c" / "fingerprints.json").read_text())
    assert model_fingerprint("someone/not-a-local-folder") is None


@pytest.mark.parametrize(
    "damage", ["truncate_peft", "bad_config_json", "truncate_peftkit", "bad_meta_json", "garbage_header"]
)
def test_damaged_folders_raise_clear_errors(damage, runs, tmp_path):
    method = "bottleneck" if damage == "truncate_peftkit" else "lora"
    out = export_adapter(runs.run(method), tmp_path / "e")
    target = {
        "truncate_peft": "adapter_model.safetensors",
        "bad_config_json": "adapter_config.json",
        "truncate_peftkit": "peftkit_weights.safetensors",
        "bad_meta_json": "peftkit.json",
        "garbage_header": "adapter_model.safetensors",
    }[damage]
    path = out / target
    data = path.read_bytes()
    if damage.startswith("truncate"):
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        path.write_bytes(b"\xff" * 16 + data[16:])
    else:
        path.write_text(data.decode()[:-20])
    with pytest.raises(PeftkitError) as info:
        load(out)
    assert target in str(info.value)


def test_weighted_merge_of_adapter_with_itself_reproduces_it(runs, tmp_path, capsys):
    run = runs.run("lora")
    original = load(run / "adapter")
    expected = logits_of(original.model, original.tokenizer)
    single, note = combine_adapters([run], [1.0], "linear", out=tmp_path / "one")
    assert "head" in note
    got = load(single)
    assert torch.allclose(logits_of(got.model, got.tokenizer), expected, atol=1e-5)
    # two copies at 0.5 each, concatenated: delta = 0.5·BA + 0.5·BA
    assert (
        main(
            [
                "combine",
                str(run / "adapter"),
                str(run / "adapter"),
                "--weights",
                "0.5,0.5",
                "--how",
                "cat",
                "--out",
                str(tmp_path / "two"),
            ]
        )
        == 0
    )
    assert "head: taken from" in capsys.readouterr().out
    two = load(tmp_path / "two")
    assert torch.allclose(logits_of(two.model, two.tokenizer), expected, atol=1e-5)
    assert AdapterMeta.read(tmp_path / "two").method_options["r"] == 16


def test_weighted_merge_combines_two_and_refuses_bad_input(runs, tmp_path, capsys):
    a, b = runs.run("lora", seed=0), runs.run("lora", seed=1)
    out, _ = combine_adapters([a, b], [0.5, 0.5], "ties", density=0.5, out=tmp_path / "ties")
    merged = load(out)
    la, lm = logits_of(load(a / "adapter").model, merged.tokenizer), logits_of(merged.model, merged.tokenizer)
    assert lm.shape == la.shape and not torch.equal(lm, la)
    assert main(["combine", str(a), str(runs.run("ia3")), "--weights", "0.5,0.5", "--out", str(tmp_path / "x")]) == 2
    assert "plain LoRA adapters only" in capsys.readouterr().err
    r4 = str(runs.run("lora", r=4))
    assert main(["combine", str(a), r4, "--weights", "0.5,0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--how cat" in capsys.readouterr().err
    assert main(["combine", str(a), str(b), "--weights", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "one per adapter" in capsys.readouterr().err
    assert main(["combine", str(a), "--weights", "1", "--how", "mean", "--out", str(tmp_path / "x")]) == 2
    assert "linear, ties" in capsys.readouterr().err
    assert main(["combine", str(a), str(b), "--weights", "nan,0.5", "--out", str(tmp_path / "x")]) == 2
    assert "finite" in capsys.readouterr().err and not (tmp_path / "x").exists()
