"""Recipes parse and resolve; overrides are typed and checked; CLI mistakes are one clean line with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftkit.cli import main
from peftkit.config import MethodSpec, RunConfig, TaskConfig, TrainConfig
from peftkit.errors import PeftkitError
from peftkit.recipe_files import apply_overrides, list_recipes, load_config
from peftkit.trainable_table import count_key, read_table, trainable_pct

TASKS = ("sst2", "banking77", "financial_phrasebank", "rte", "mrpc")


def test_every_task_has_the_core_recipes_and_all_recipes_resolve():
    recipes = list_recipes()
    for task in TASKS:
        for method in ("full", "bottleneck", "lora", "adalora", "prompt"):
            assert f"{task}-{method}" in recipes
    assert len(recipes) >= 30
    for name in recipes:
        config = load_config(recipe=name)
        assert config.recipe == name and config.task.name in TASKS
        assert name.split("-")[1] in (config.method.name, "prompt", "lora")


def test_override_types_are_checked_and_converted():
    config = load_config(
        recipe="sst2-lora",
        overrides=[
            "train.lr=1e-4",
            "method.r=16",
            "train.bf16=true",
            "method.target_modules=query,key",
            "task.max_train_examples=100",
        ],
    )
    assert config.train.lr == 1e-4 and config.method.options.r == 16 and config.train.bf16 is True
    assert config.method.options.target_modules == ["query", "key"]
    with pytest.raises(PeftkitError, match="train.batch_size must be an integer"):
        load_config(recipe="sst2-lora", overrides=["train.batch_size=big"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1e-4"], "unknown key in train 'lrr'. Did you mean 'lr'"),
        (["method.rank=4"], "unknown key in method \\(lora\\) 'rank'"),
        (["trian.lr=1"], "unknown config section 'trian'. Did you mean 'train'"),
        (["lr=1"], "must look like section.key=value"),
        (["method.name=lorra"], "unknown method 'lorra'. Did you mean 'lora'"),
        (["method.name=full", "method.r=8"], "method \\(full\\) has no keys to set, got 'r'"),
    ],
)
def test_bad_overrides_name_the_problem(overrides, message):
    with pytest.raises(PeftkitError, match=message):
        load_config(recipe="sst2-lora", overrides=overrides)


def test_one_override_given_as_a_string_is_one_override():
    """A str is one override, as HF and torchtune users pass one, not one override per character ("override 't'")."""
    assert load_config(recipe="sst2-lora", overrides="train.lr=1e-3").train.lr == 1e-3
    assert load_config(recipe="sst2-lora", overrides=None).train.lr == load_config(recipe="sst2-lora").train.lr
    with pytest.raises(PeftkitError, match="an override must be a string section.key=value .*, got int 3"):
        load_config(recipe="sst2-lora", overrides=["train.lr=1e-3", 3])


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"train": TrainConfig(batch_size=0)}, "train.batch_size must be at least 1, got 0"),
        ({"train": TrainConfig(lr=float("nan"))}, "train.lr must be a finite number, got nan"),
        ({"train": TrainConfig(batching="shuffled")}, "unknown train.batching 'shuffled'. Valid: bucketed, random"),
        ({"task": TaskConfig(max_length="long")}, "task.max_length must be an integer"),
        ({"train": {"lr": 1e-3}}, "RunConfig.train must be a TrainConfig, got dict"),
        ({"method": MethodSpec("lora", {"r": 4})}, "RunConfig.method.options must be the method's options dataclass"),
        ({"method": MethodSpec("lorra", None)}, "unknown method 'lorra'. Did you mean 'lora'"),
        (None, "train\\(\\) takes a RunConfig \\(peftkit.load_config builds one\\), got dict"),
    ],
)
def test_a_config_built_in_code_is_checked_before_training(sections, message, tmp_path):
    from peftkit.loop import train

    config = RunConfig(**sections) if sections is not None else {"train": {"lr": 1e-3}}
    with pytest.raises(PeftkitError, match=message):  # before anything loads: no model, no data, no run folder
        train(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_checking_a_config_built_in_code_converts_as_a_recipe_does(tmp_path):
    train = TrainConfig(lr="3e-4", epochs=2, output_dir=tmp_path)  # a Path: was AttributeError deep in the run
    config = RunConfig(task=TaskConfig(name=tmp_path / "t.csv"), train=train, method=MethodSpec("lora", None)).check()
    assert config.train.lr == 3e-4 and config.train.epochs == 2.0 and config.method.options.r == 8
    assert config.train.output_dir == str(tmp_path) and config.task.name == str(tmp_path / "t.csv")
    assert RunConfig.from_dict(config.to_dict()) == config


def test_overriding_the_method_drops_the_recipes_options_of_the_old_one(capsys):
    config = load_config(recipe="sst2-lora", overrides=["method.target_modules=[query]", "method.name=ia3"])
    assert config.method.name == "ia3" and config.method.options.target_modules == ["query"]  # given: kept
    assert config.method.options.feedforward_modules is None  # ia3's own default
    note = capsys.readouterr().err
    assert note.startswith("peftkit: note: method.name=ia3 drops the recipe's lora options (r, alpha, dropout)")
    with pytest.raises(PeftkitError, match=r"unknown key in method \(ia3\) 'r'"):  # given, but not ia3's
        load_config(recipe="sst2-lora", overrides=["method.name=ia3", "method.r=4"])
    assert capsys.readouterr().err == ""  # a refused config is its one error line only
    same = load_config(recipe="sst2-lora", overrides=["method.name=lora"])  # the same method: options stay
    assert same.method.options.target_modules == ["query", "value"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "override", ["method.name=full", "task.name=mrpc", "model.name_or_path=prajjwal1/bert-tiny", "train.lr=1e-3"]
)
def test_an_override_that_changes_the_run_drops_the_recipes_expected_result(override, capsys):
    """sst2-lora's measured accuracy was recorded (config.yaml) and printed for a run of another method, task,
    model or learning rate."""
    assert load_config(recipe="sst2-lora").expected is not None
    config = load_config(recipe="sst2-lora", overrides=[override])
    assert config.expected is None and "expected" not in config.to_yaml()
    assert "sst2-lora's expected result (accuracy 0.8448) is dropped, not recorded" in capsys.readouterr().err
    for same in (["train.progress=false", "train.run_name=x"], ["train.lr=0.003", "method.name=lora"]):
        assert load_config(recipe="sst2-lora", overrides=same).expected is not None  # nothing the numbers depend on
    assert capsys.readouterr().err == ""


def test_a_method_or_task_switch_says_the_train_settings_are_the_recipes(capsys, tmp_path):
    from peftkit.resume import resume_view

    config = load_config(recipe="sst2-lora", overrides=["method.name=full", "task.name=mrpc"])
    assert config.train.lr == 0.003  # kept, never silently changed
    assert (
        "sst2-lora's train settings (train.lr=0.003) were chosen for lora on sst2 and are kept as they are for full "
        "on mrpc; tune them (train.lr=...) for it" in capsys.readouterr().err
    )
    load_config(recipe="sst2-lora", overrides=["method.name=full", "train.lr=1e-5"])
    assert "train settings were chosen for lora on sst2" in capsys.readouterr().err
    mine = tmp_path / "mine.yaml"  # a user's own file: its train settings are the user's, no such note
    mine.write_text("task: {name: sst2}\nmethod: {name: lora}\ntrain: {lr: 0.003}\n")
    load_config(config_file=str(mine), overrides=["method.name=full"])
    assert "were chosen for" not in capsys.readouterr().err
    # a resume that raises the budget drops the expected result too, and still continues the same run
    longer = load_config(recipe="sst2-lora", overrides=["train.max_steps=9"])
    assert resume_view(longer) == resume_view(load_config(recipe="sst2-lora"))


def test_apply_overrides_does_not_mutate_the_recipe():
    data = {"train": {"lr": 1.0}}
    apply_overrides(data, ["train.lr=2"])
    assert data == {"train": {"lr": 1.0}}


def test_user_config_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("task: {name: sst2}\nmethod: {name: ia3}\ntrain: {max_steps: 10}\n")
    config = load_config(config_file=str(path))
    assert config.method.name == "ia3" and config.train.max_steps == 10 and config.recipe == "mine"


def test_an_override_into_a_section_that_is_not_a_mapping_is_one_line(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("task: {name: sst2}\nmethod: lora\n")
    with pytest.raises(PeftkitError, match="config section method must be a mapping of keys, got 'lora'"):
        load_config(config_file=str(path), overrides=["method.r=4"])


def test_a_key_written_twice_is_refused_naming_it_and_its_line(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("task: {name: sst2}\nmethod:\n  name: lora\n  r: 4\n  r: 8\n")
    with pytest.raises(PeftkitError, match=rf"{path} is not valid YAML: duplicate key 'r' \(line 5\)"):
        load_config(config_file=str(path))
    path.write_text("task: {name: sst2}\nmethod: {name: lora}\ntrain: {lr: 1}\ntrain: {seed: 1}\n")
    with pytest.raises(PeftkitError, match=r"duplicate key 'train' \(line 4\)"):
        load_config(config_file=str(path))
    with pytest.raises(PeftkitError, match="override 'method.target_modules={a: 1, a: 2}': duplicate key 'a'"):
        load_config(recipe="sst2-lora", overrides=["method.target_modules={a: 1, a: 2}"])


def test_a_users_own_yaml_includes_the_built_in_parts(tmp_path):
    """Includes resolved only beside the including file, so a YAML outside the package (the wheel installs the
    parts in site-packages) could not include `tasks/sst2.yaml`: "config file .../tasks/sst2.yaml does not exist"."""
    path = tmp_path / "mine.yaml"
    path.write_text("include: [tasks/sst2.yaml, methods/lora.yaml]\ntrain: {max_steps: 3}\n")
    config = load_config(config_file=str(path))
    assert (config.task.name, config.method.name, config.method.options.r) == ("sst2", "lora", 8)
    assert config.train.max_steps == 3
    path.write_text("include: tasks/sst3.yaml\n")
    with pytest.raises(PeftkitError, match=r"unknown include .* 'tasks/sst3.yaml'. Did you mean 'tasks/sst2.yaml'"):
        load_config(config_file=str(path))


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "sst2-lorra"], "unknown recipe 'sst2-lorra'. Did you mean 'sst2-lora'"),
        (["train", "sst2-lora", "train.lrr=1"], "Did you mean 'lr'"),
        (["train", "--config", "/nonexistent.yaml"], "does not exist"),
        (["eval", "/nonexistent-run"], "not a run folder"),
    ],
)
def test_cli_errors_are_one_line_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and err.startswith("peftkit: error:")


def test_overrides_after_a_flag_are_kept_in_order(capsys):
    argv = ["train", "sst2-lora", "train.lr=1e-4", "--dry-run", "train.lr=2e-4", "method.r=4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.0002" in printed and "r: 4" in printed
    with pytest.raises(SystemExit) as stopped:
        main(["train", "sst2-lora", "--dry-run", "--no-such-flag"])
    assert stopped.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_dry_run_prints_local_paths_as_the_run_records_them(tmp_path, monkeypatch, capsys):
    """The run records task files made absolute; --dry-run printed them as typed, relative to nothing."""
    (tmp_path / "mine.jsonl").write_text('{"text": "a", "label": "x"}\n')
    monkeypatch.chdir(tmp_path)
    assert main(["train", "sst2-lora", "task.name=mine.jsonl", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"name: {tmp_path / 'mine.jsonl'}" in printed


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.checkpoint_every=50"], "cannot be checkpointed for an exact resume"),
        (["model.quantization=8bit"], "cannot train on a quantized base"),
    ],
)
def test_dry_run_refuses_settings_the_method_cannot_honour(overrides, fragment, capsys):
    """They were refused only once train had tokenised the data and loaded the model; --dry-run passed them."""
    method = "adalora" if "checkpoint" in overrides[0] else "prompt"
    assert main(["train", f"sst2-{method}", *overrides, "--dry-run"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("peftkit: note:")]
    assert len(errors) == 1 and fragment in errors[0]


def test_a_data_folder_from_a_relative_peftkit_data_is_recorded_absolute(
    tiny_model_dir, toy_task_dir, tmp_path, monkeypatch, capsys
):
    """A run that read its task from a relative $PEFTKIT_DATA recorded data_dir: null, so eval (or --resume) from
    another folder found no such task, or read another folder's."""
    import shutil

    project, elsewhere, run = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "run"
    shutil.copytree(toy_task_dir, project / "data" / "toy")
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("PEFTKIT_DATA", "data")
    tiny = [f"model.name_or_path={tiny_model_dir('bert')}", "train.max_steps=1", "train.progress=false"]
    args = ["train", "sst2-lora", "task.name=toy", *tiny, "task.max_length=32", "task.dev_size=null"]
    assert main([*args, "--run-dir", str(run)]) == 0
    assert f"data_dir: {project / 'data'}\n" in (run / "config.yaml").read_text()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("PEFTKIT_DATA")
    assert main(["eval", str(run)]) == 0
    assert main(["eval", str(run), "--data-dir", "../project/data"]) == 0  # eval's own, relative to where it runs
    assert '"examples": 32' in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag (see peftkit --help)"),
        (
            ["combine", "a", "--out", "b"],
            "the following arguments are required: --weights (see peftkit combine --help)",
        ),
    ],
)
def test_usage_errors_say_peftkit_error_once(argv, line, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and capsys.readouterr().err == f"peftkit: error: {line}\n"


def test_a_value_starting_with_a_minus_sign_is_a_value():
    from peftkit.cli import build_parser

    args = build_parser().parse_args(["combine", "a", "b", "--weights", "-1,0.5", "--out", "ab"])
    assert args.weights == "-1,0.5" and args.adapters == ["a", "b"]
    assert build_parser().parse_args(["combine", "a", "--weights", "-.5", "--out", "ab"]).weights == "-.5"


def test_cli_error_has_no_traceback_in_a_real_process():
    result = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", "sst2-lorra"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "sst2-lora" in result.stderr


def test_recipes_command_lists_names_and_trainable_share(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    # LoRA r=8 on query/value of MiniLM + classifier + the pooler it pools with: 222,338 / 22.94M (peft's head copies)
    assert "sst2-lora" in out and "0.969" in out
    assert "100.000" in out  # full fine-tuning


def test_expected_section_is_read_checked_and_listed(tmp_path, monkeypatch, capsys):
    import peftkit.recipe_files as recipe_files

    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "toy-lora.yaml").write_text(
        "task: {name: sst2}\nmethod: {name: lora}\n"
        "expected: {metric: accuracy, mean: 0.912, std: 0.004, seeds: 3, profile: converged}\n"
    )
    (folder / "toy-ia3.yaml").write_text("task: {name: sst2}\nmethod: {name: ia3}\n")
    monkeypatch.setattr(recipe_files, "recipes_dir", lambda: folder)
    config = load_config(recipe="toy-lora")
    assert config.expected.mean == 0.912 and config.expected.seeds == 3
    assert config.to_dict()["expected"]["profile"] == "converged"
    assert main(["recipes", "--no-params"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "accuracy 91.2 ± 0.4 (converged)" in lines["toy-lora"]
    assert "accuracy" not in lines["toy-ia3"]  # not measured: nothing claimed
    with pytest.raises(PeftkitError, match="expected.metric"):
        RunConfig.from_dict({"method": {"name": "lora"}, "expected": {"metric": "acc", "mean": 0.9}})


def test_train_and_eval_commands_on_a_tiny_model(tiny_model_dir, toy_task_dir, tmp_path, capsys):
    from peftkit.inference import evaluate_run

    run = tmp_path / "run"
    code = main(
        [
            "train",
            "sst2-lora",
            f"task.name={toy_task_dir}",
            f"model.name_or_path={tiny_model_dir('bert')}",
            "train.max_steps=3",
            "train.progress=false",
            "task.max_length=32",
            "task.dev_size=null",  # the recipe carves 1,000 sst2 rows for dev; the toy task has 96
            "--run-dir",
            str(run),
        ]
    )
    assert code == 0 and "validation accuracy" in capsys.readouterr().out
    assert main(["eval", str(run), "--split", "test"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = evaluate_run(run, "test")  # the Python API: typed fields, the same numbers as the CLI prints
    assert printed == result.to_dict() and list(printed)[:4] == ["split", "examples", "bf16", "accuracy"]
    assert result.split == "test" and result.examples == printed["examples"] and "loss" in result.metrics


def test_resume_from_the_cli_continues_a_run(tiny_model_dir, toy_task_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "sst2-lora",
        f"task.name={toy_task_dir}",
        f"model.name_or_path={tiny_model_dir('bert')}",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.progress=false",
        "task.max_length=32",
        "task.dev_size=null",
    ]
    assert main([*args, "--run-dir", str(run)]) == 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]
    assert main(["train", "--resume", str(run)]) == 2  # a finished run: nothing to resume
    assert "is a finished run" in capsys.readouterr().err
    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    assert main(["train", "--resume", str(run)]) == 0
    assert "sst2-lora:" in capsys.readouterr().out.splitlines()[-1]  # the recipe name survives the resume


def test_overrides_after_config_file_are_applied(tmp_path, tiny_model_dir, toy_task_dir):
    path = tmp_path / "mine.yaml"
    path.write_text(
        f"task: {{name: {toy_task_dir}, max_length: 32}}\nmodel: {{name_or_path: {tiny_model_dir('bert')}}}\n"
        "method: {name: lora}\ntrain: {max_steps: 2, progress: false}\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(path), "train.max_steps=3", "--run-dir", str(run)]) == 0
    assert "max_steps: 3" in (run / "config.yaml").read_text()
    assert main(["train", "sst2-lora", "--config", str(path)]) == 2


def test_train_line_reports_validation_and_names_the_dev_score_apart(tiny_model_dir, toy_task_dir, tmp_path, capsys):
    """With a dev split the kept step is chosen on dev; the line must not print that dev score as validation."""
    run = tmp_path / "run"
    args = ["train", "sst2-lora", f"task.name={toy_task_dir}", f"model.name_or_path={tiny_model_dir('bert')}"]
    args += ["train.max_steps=4", "train.eval_every=2", "task.dev_size=0.25", "train.progress=false"]
    assert main([*args, "task.max_length=32", "--run-dir", str(run)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert f"validation accuracy {summary['validation']['accuracy']:.4f}" in line
    assert f"; dev accuracy {summary['best']['accuracy']:.4f}" in line and "(kept step" in line


@pytest.mark.parametrize("finished", [True, False])
def test_run_dir_holding_a_run_is_never_trained_over(finished, tiny_model_dir, toy_task_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)  # a run that can resume
    if finished:
        (run / "summary.json").write_text("{}")
    args = ["train", "sst2-lora", f"task.name={toy_task_dir}", f"model.name_or_path={tiny_model_dir('bert')}"]
    args += ["train.max_steps=1", "train.progress=false", "task.dev_size=null", "--run-dir", str(run)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("already holds a finished run" if finished else f"continue it with --resume {run}") in err
    assert str(run) in err and "another --run-dir" in err
    assert not (run / "config.yaml").exists() and not (run / "adapter").exists()  # nothing written over it


def test_the_recipe_listing_is_quiet_and_counts_without_weights():
    """`peftkit recipes` printed peft's BOFT warnings about its CUDA kernels (8 lines) above the table."""
    import warnings

    from peftkit.modeling import trainable_pct_without_weights

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pct = trainable_pct_without_weights(load_config(recipe="sst2-boft"))
    assert [str(w.message) for w in caught] == []
    assert pct == read_table()["sst2-boft"]["pct"] == "0.750"  # the shipped count is what counting gives


def test_recipes_listing_reads_the_shipped_counts_and_recounts_a_changed_recipe(monkeypatch, capsys):
    """`peftkit recipes` imported transformers and peft and built every recipe's model (10-25 s on 2 cores) for
    counts that change only with a recipe, a method or peft: it reads recipes/trainable.json, and counts only a
    recipe whose entry no longer matches it or was counted under other library versions."""
    import peftkit.modeling as modeling
    import peftkit.trainable_table as trainable_table

    # As if the installed peft and transformers were the ones the table was counted with (CI may install newer).
    shipped_libraries = read_table()["sst2-lora"]["libraries"]
    monkeypatch.setattr(trainable_table, "libraries", lambda: shipped_libraries)
    counted = []
    monkeypatch.setattr(modeling, "trainable_pct_without_weights", lambda cfg: counted.append(cfg) or "1.234")
    assert main(["recipes"]) == 0
    pcts = {line.split()[0]: line.split()[3] for line in capsys.readouterr().out.splitlines()[2:]}
    assert counted == [] and pcts["sst2-boft"] == "0.750" and pcts["financial_phrasebank-boft"] == "0.752"
    assert trainable_pct(load_config(recipe="sst2-lora", overrides=["method.r=16"]), read_table()) == "1.234"
    # Another peft or transformers counts afresh rather than trusting the table.
    monkeypatch.setattr(trainable_table, "libraries", lambda: "peft 99.0, transformers 99.0")
    assert trainable_pct(load_config(recipe="sst2-lora"), read_table()) == "1.234"


def test_the_shipped_trainable_table_matches_every_recipe():
    """An edited or new recipe needs its count rewritten: python -m peftkit.trainable_table."""
    table = read_table()
    assert sorted(table) == sorted(list_recipes())
    assert [name for name in table if table[name]["key"] != count_key(load_config(recipe=name))] == []


def test_importing_bitsandbytes_under_the_cli_prints_nothing():
    """peft imports bitsandbytes, which on an AVX512-BF16 CPU asks `kernels` for a Hub kernel and logs two warnings
    when it cannot have it (offline); every peftkit command printed them before its own output."""
    code = "from peftkit.console import quiet_libraries; quiet_libraries(); import peft, bitsandbytes"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stderr == ""
