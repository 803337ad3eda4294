"""Issue 11, loop half: the divergence guard, data checks that name file and line, resume that refuses a different
run, falls back past a damaged checkpoint and verifies what it loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from peftkit.adapters.lora import LoRA
from peftkit.config import RunConfig, TaskConfig
from peftkit.data import load_task
from peftkit.errors import PeftkitError
from peftkit.export import export_merged
from peftkit.io import load_tensors
from peftkit.loop import train


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def good_rows(n=20):
    return [{"text": f"row {i} {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(n)]


def poison_at(monkeypatch, at_step):
    """After optimizer step `at_step` (0-based, as the hook sees it), set one LoRA weight to NaN."""
    original = LoRA.after_optimizer_step

    def hook(self, model, step):
        if step == at_step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
        return original(self, model, step)

    monkeypatch.setattr(LoRA, "after_optimizer_step", hook)


def crash_at(monkeypatch, at_step):
    original = LoRA.after_optimizer_step

    def hook(self, model, step):
        if step == at_step:
            raise RuntimeError("simulated crash")
        return original(self, model, step)

    monkeypatch.setattr(LoRA, "after_optimizer_step", hook)
    return original


# --------------------------------------------------------------------------------------------- divergence guard


def test_non_finite_loss_stops_at_its_step_naming_the_last_good_checkpoint(tiny_run_config, tmp_path, monkeypatch):
    poison_at(monkeypatch, 2)  # weights NaN after the 3rd step; the 4th step's loss is NaN
    with pytest.raises(PeftkitError, match=r"loss is nan at step 4;.*last good checkpoint: .*step-0000002") as e:
        train(tiny_run_config("lora", max_steps=6, checkpoint_every=2), run_dir=tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "adapter").exists()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-0000002"]


def test_non_finite_weights_are_never_written_as_an_adapter(tiny_run_config, tmp_path, monkeypatch):
    poison_at(monkeypatch, 3)  # the last step: no loss ever sees it
    with pytest.raises(PeftkitError, match="holds non-finite values at step 4; the adapter was not written"):
        train(tiny_run_config("lora", max_steps=4), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()


def test_divergence_at_the_last_step_is_reported_behind_an_earlier_best(tiny_run_config, tmp_path, monkeypatch):
    poison_at(monkeypatch, 3)  # the last step, after a finite best at step 2 the run would roll back to
    with pytest.raises(PeftkitError, match="holds non-finite values at step 4; the adapter was not written"):
        train(tiny_run_config("lora", max_steps=4, eval_every=2), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "split" in line] == [2]  # NaN weights never scored


def test_metrics_jsonl_is_strict_json(tmp_path):
    from peftkit.loggers import MetricsLog

    MetricsLog(tmp_path / "metrics.jsonl", enabled=True).write({"step": 1, "task_loss": float("nan")})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}")) == {"step": 1, "task_loss": None}


# --------------------------------------------------------------------------------------------- data


def test_bad_texts_and_labels_name_file_and_line(tmp_path):
    cases = [
        ({"text": None, "label": 0}, "'text' is null"),
        ({"text": {"a": 1}, "label": 0}, "'text' must be a string, got dict"),
        ({"text": "  ", "label": 0}, "'text' is empty"),
        ('{"text": "\\ud800 x", "label": 0}', "lone surrogate"),
        ('{"text": "nan label", "label": NaN}', "label must be a string or an integer, got float NaN"),
        ({"text": "list label", "label": [1]}, "label must be a string or an integer, got list"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ]
    for row, message in cases:
        path = write_jsonl(tmp_path / "rows.jsonl", [*good_rows(6), row, *good_rows(6)])
        pattern = f"rows.jsonl:7.*{message}" if "nested" not in message else "rows.jsonl:7 is nested too deeply"
        with pytest.raises(PeftkitError, match=pattern):
            load_task(TaskConfig(name=str(path), validation_file=str(write_jsonl(tmp_path / "v.jsonl", good_rows(4)))))


def test_labels_missing_after_row_one_and_a_single_class_are_refused(tmp_path):
    rows = good_rows(10)
    path = write_jsonl(tmp_path / "rows.jsonl", rows[:3] + [{"text": "no label"}] + rows[3:])
    with pytest.raises(PeftkitError, match=r"rows.jsonl:4: no 'label' value \(every train row needs a label\)"):
        load_task(TaskConfig(name=str(path)))
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "x"} for i in range(10)])
    with pytest.raises(PeftkitError, match="has 1 class \\(x\\); a classifier needs at least 2 classes"):
        load_task(TaskConfig(name=str(path)))


def test_meta_label_names_must_be_a_list_and_json(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", good_rows())
    write_jsonl(folder / "validation.jsonl", good_rows(4))
    (folder / "meta.json").write_text(json.dumps({"label_names": "negative"}))
    with pytest.raises(PeftkitError, match="label_names must be a list of strings, got 'negative'"):
        load_task(TaskConfig(name=str(folder)))
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(PeftkitError, match="meta.json is not valid JSON"):
        load_task(TaskConfig(name=str(folder)))
    (folder / "meta.json").write_text(json.dumps({"label_names": ["neg", "pos"]}))
    write_jsonl(folder / "validation.jsonl", [{"text": "x", "label": "neutral"}])
    with pytest.raises(PeftkitError, match="validation.jsonl:1.*'neutral'"):
        load_task(TaskConfig(name=str(folder)))
    (folder / "validation.jsonl").write_text("")
    with pytest.raises(PeftkitError, match="the validation split has no rows"):
        load_task(TaskConfig(name=str(folder)))


def test_encoding_must_be_utf8_or_declared(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [json.dumps({"text": f"caf\u00e9 {i}", "label": i % 2}, ensure_ascii=False) for i in range(20)]
    path.write_bytes("".join(r + "\n" for r in rows).encode("latin-1"))
    with pytest.raises(PeftkitError, match=r"rows.jsonl:1 is not valid utf-8 text.*task.encoding"):
        load_task(TaskConfig(name=str(path)))
    task = load_task(TaskConfig(name=str(path), encoding="latin-1"))
    assert any(r["text"].startswith("caf\u00e9") for r in task.splits["train"])


def test_csv_dialect_is_sniffed_and_extra_cells_name_the_line(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text;label\n" + "".join(f"row, {i};{i % 2}\n" for i in range(20)))
    task = load_task(TaskConfig(name=str(path)))
    assert len(task.splits["train"]) + len(task.splits["validation"]) == 20
    assert task.splits["train"][0]["text"].startswith("row, ")
    path.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(5)) + "a,1,extra\n")
    with pytest.raises(PeftkitError, match="rows.csv:7 has 3 cells but the header has 2"):
        load_task(TaskConfig(name=str(path)))
    task = load_task(TaskConfig(name=str(path), on_bad_row="skip"))
    assert task.skipped_rows == [f"{path}:7"]


def test_skipped_rows_are_counted_in_the_summary(tiny_run_config, tmp_path):
    rows = good_rows(30)
    path = write_jsonl(tmp_path / "rows.jsonl", rows[:5] + [{"text": None, "label": 0}, "{broken"] + rows[5:])
    config = tiny_run_config("lora", max_steps=2)
    config.task.name, config.task.on_bad_row = str(path), "skip"
    summary = train(config, run_dir=tmp_path / "run")
    assert summary.extra["skipped_rows"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["extra"]["skipped_rows"] == 2


def test_max_length_beyond_the_models_positions_and_unknown_target_modules_are_one_line(tiny_run_config, tmp_path):
    config = tiny_run_config("lora")
    config.task.max_length = 100_000
    with pytest.raises(PeftkitError, match="task.max_length=100000 exceeds the model's 128 positions"):
        train(config, run_dir=tmp_path / "a")
    config = tiny_run_config("lora", method_options={"target_modules": ["nosuchmodule"]})
    with pytest.raises(PeftkitError, match=r"could not be applied .*\['nosuchmodule'\]") as e:
        train(config, run_dir=tmp_path / "b")
    assert "\n" not in str(e.value)


def test_a_base_saved_in_half_precision_trains_in_float32_and_a_foreign_tokenizer_is_one_line(
    tiny_run_config, tiny_model_dir, tmp_path
):
    """transformers 5 loads a folder in its config.json dtype: an fp16 base failed in the CPU's layer norm, a bf16
    one trained bf16 adapters under train.bf16=false. A tokenizer with more tokens than the model embeds died in the
    first batch's embedding lookup (IndexError)."""
    import shutil

    from transformers import AutoModel, AutoTokenizer

    def base_like_tiny_bert(name, change):
        folder = tmp_path / name
        change(AutoModel.from_pretrained(tiny_model_dir("bert"))).save_pretrained(folder)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_model_dir("bert") / file, folder / file)
        config = tiny_run_config("lora", bf16=False)
        config.model.name_or_path = str(folder)
        return config

    for dtype in (torch.float16, torch.bfloat16):
        config = base_like_tiny_bert(str(dtype), lambda model, dtype=dtype: model.to(dtype))
        train(config, run_dir=tmp_path / f"run-{dtype}")
        weights = load_tensors(tmp_path / f"run-{dtype}" / "adapter" / "adapter_model.safetensors")
        assert {t.dtype for t in weights.values()} == {torch.float32}
        merged = export_merged(tmp_path / f"run-{dtype}", tmp_path / f"merged-{dtype}")  # shipped as the base was
        assert {t.dtype for t in load_tensors(merged / "model.safetensors").values()} == {dtype}
        assert json.loads((merged / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")

    config = base_like_tiny_bert("added-token", lambda model: model)  # a token the data never produces: no harm
    tokenizer = AutoTokenizer.from_pretrained(config.model.name_or_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<never>"]})
    tokenizer.save_pretrained(config.model.name_or_path)
    train(config, run_dir=tmp_path / "added-token")

    def small_vocabulary(model):
        model.resize_token_embeddings(1000)
        return model

    config = base_like_tiny_bert("small-vocab", small_vocabulary)
    with pytest.raises(PeftkitError, match="the tokenizer gives token id .* but the model embeds only 1,000 tokens"):
        train(config, run_dir=tmp_path / "foreign")


@pytest.mark.parametrize(
    "train_opts, recipe",
    [({"run_name": "../../x"}, "r"), ({"run_name": "/tmp/x"}, "r"), ({}, "../../x"), ({}, "/abs/recipe")],
)
def test_run_folders_cannot_escape_output_dir(train_opts, recipe):
    with pytest.raises(PeftkitError, match="must be a plain folder name"):
        RunConfig.from_dict({"recipe": recipe, "method": {"name": "lora"}, "train": train_opts})


# --------------------------------------------------------------------------------------------- resume


@pytest.fixture
def crashed_run(tiny_run_config, tmp_path, monkeypatch):
    """A run of 8 steps with checkpoints at 2, 4 and 6 (kept: 4 and 6), crashed after step 7."""
    steps = dict(max_steps=8, checkpoint_every=2, eval_every=4)
    original = crash_at(monkeypatch, 6)
    with pytest.raises(RuntimeError):
        train(tiny_run_config("lora", **steps), run_dir=tmp_path / "crashed")
    monkeypatch.setattr(LoRA, "after_optimizer_step", original)
    return tmp_path / "crashed", steps


def test_resume_with_a_changed_config_names_the_changed_keys(crashed_run, tiny_run_config):
    run, steps = crashed_run
    before = (run / "config.yaml").read_text()
    with pytest.raises(PeftkitError, match=r"train.batch_size \(8 -> 4\), train.lr .*train.seed \(0 -> 3\) changed"):
        train(tiny_run_config("lora", **{**steps, "lr": 0.5, "seed": 3, "batch_size": 4}), resume=run)
    with pytest.raises(PeftkitError, match=r"method.r \(8 -> 4\) changed"):
        train(tiny_run_config("lora", method_options={"r": 4}, **steps), resume=run)
    assert (run / "config.yaml").read_text() == before, "config.yaml must not claim values that were not used"


def test_resume_may_change_every_budget_setting_alike(crashed_run, tiny_run_config):
    run, steps = crashed_run  # train.max_epochs, like train.epochs and train.max_steps, is the step budget
    assert train(tiny_run_config("lora", **steps, epochs=2, max_epochs=5), resume=run).steps == 8


def test_checkpoints_after_falling_back_past_a_damaged_one_replace_it(crashed_run, tiny_run_config):
    run, steps = crashed_run
    (run / "checkpoints" / "step-0000006" / "rng.safetensors").write_bytes(b"damaged")
    train(tiny_run_config("lora", **{**steps, "checkpoint_every": 5}), resume=run)  # from step 4; saves step 5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]


def test_tensorboard_after_a_resume_has_each_step_once(tiny_run_config, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = dict(max_steps=8, checkpoint_every=4)
    original = crash_at(monkeypatch, 5)  # steps 5 and 6 logged past the checkpoint at step 4
    with pytest.raises(RuntimeError):
        train(tiny_run_config("lora", **steps, report_to=["tensorboard"]), run_dir=tmp_path / "run")
    monkeypatch.setattr(LoRA, "after_optimizer_step", original)
    train(tiny_run_config("lora", **steps, report_to=["tensorboard"]), resume=tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/task_loss")] == list(range(1, 9))


def test_report_to_may_be_added_on_resume_and_a_missing_package_writes_nothing(crashed_run, tiny_run_config, tmp_path):
    run, steps = crashed_run
    pytest.importorskip("tensorboard")
    train(tiny_run_config("lora", **steps, report_to=["tensorboard"]), resume=run)
    assert (run / "tensorboard").is_dir()
    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(PeftkitError, match=r"report_to=\[mlflow\] needs the mlflow package"):
            train(tiny_run_config("lora", report_to=["mlflow"]), run_dir=tmp_path / "new")
        assert not (tmp_path / "new").exists()


def test_a_damaged_latest_checkpoint_falls_back_and_stays_bitwise(crashed_run, tiny_run_config, tmp_path, capsys):
    run, steps = crashed_run
    train(tiny_run_config("lora", **steps), run_dir=tmp_path / "straight")
    optimizer = run / "checkpoints" / "step-0000006" / "optimizer.safetensors"
    data = bytearray(optimizer.read_bytes())
    data[-8] ^= 0x40  # one flipped bit in the optimizer state
    optimizer.write_bytes(bytes(data))
    train(tiny_run_config("lora", **steps), resume=run)
    err = capsys.readouterr().err
    assert "step-0000006/optimizer.safetensors does not match its sha256" in err
    assert "resuming from the previous complete checkpoint step-0000004" in err
    a = load_tensors(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_tensors(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_damaged_is_one_line(crashed_run, tiny_run_config):
    run, steps = crashed_run
    (run / "checkpoints" / "step-0000006" / "rng.safetensors").write_bytes(b"1234567")
    state = run / "checkpoints" / "step-0000004" / "state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "scheduler"}))
    with pytest.raises(PeftkitError, match="no complete, undamaged checkpoint.*rng.safetensors.*state.json") as e:
        train(tiny_run_config("lora", **steps), resume=run)
    assert "\n" not in str(e.value)


def test_an_interrupted_first_checkpoint_gets_the_right_hint_and_is_cleaned(tiny_run_config, tmp_path):
    run = tmp_path / "run"
    stale = run / "checkpoints" / ".step-0000002.ab12.tmp"
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_bytes(b"partial")
    with pytest.raises(PeftkitError, match="a checkpoint write was interrupted before the first one completed"):
        train(tiny_run_config("lora", max_steps=4, checkpoint_every=2), resume=run)
    assert not stale.exists()


def test_argparse_mistakes_are_one_line(capsys):
    from peftkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("peftkit: error:")


def test_model_folders_that_cannot_tokenise_are_refused_in_one_line(tmp_path):
    """A missing local folder, a folder without tokenizer files (every word would be [UNK]) and a tokenizer with
    nothing to pad with are each a PeftkitError naming the cause, before any training starts."""
    import shutil

    from transformers import AutoTokenizer

    from peftkit.config import ModelConfig
    from peftkit.modeling import load_tokenizer, resolve_model_path

    with pytest.raises(PeftkitError, match="model folder /no/such/model does not exist"):
        load_tokenizer(ModelConfig(name_or_path="/no/such/model"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(Path(resolve_model_path("default")) / "config.json", bare / "config.json")
    with pytest.raises(PeftkitError, match="lacks its tokenizer files"):
        load_tokenizer(ModelConfig(name_or_path=str(bare)))
    unpadded = AutoTokenizer.from_pretrained(resolve_model_path("default"))
    unpadded.pad_token = None
    unpadded.save_pretrained(tmp_path / "unpadded")
    shutil.copy(bare / "config.json", tmp_path / "unpadded" / "config.json")
    with pytest.raises(PeftkitError, match="no pad token and no eos token"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "unpadded")))


def test_a_path_that_is_not_a_model_folder_is_named_as_such(tmp_path):
    """A folder without config.json (the data folder, the cwd) or a file was "cannot load a tokenizer from ...:
    Couldn't instantiate the backend tokenizer from one of:", a line that stopped before saying anything."""
    from peftkit.config import ModelConfig
    from peftkit.modeling import load_tokenizer

    (tmp_path / "texts.jsonl").write_text("{}\n")
    for path in (tmp_path, tmp_path / "texts.jsonl"):
        with pytest.raises(PeftkitError, match=r"is not a Hugging Face model folder \(no config.json in it\)"):
            load_tokenizer(ModelConfig(name_or_path=str(path)))
