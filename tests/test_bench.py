"""`peftkit bench` end to end on a tiny BERT and two toy tasks: cells, resume, a failing cell, tables, plots,
--report."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from peftkit.bench import aggregate, available_profiles, load_profile, pareto_front
from peftkit.cli import main


@pytest.fixture(scope="module")
def three_class_task(tmp_path_factory) -> Path:
    """A 3-class toy task, so one task reports accuracy + f1 (binary) and the other accuracy + macro_f1."""
    folder = tmp_path_factory.mktemp("data3") / "toy3"
    folder.mkdir()
    rng = random.Random(1)
    words = [["awful", "terrible"], ["okay", "average"], ["great", "excellent"]]
    for split, n in (("train", 120), ("validation", 30), ("test", 30)):
        rows = []
        for _ in range(n):
            label = rng.randrange(3)
            rows.append({"text": f"the service was {rng.choice(words[label])}", "label": label})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "meta.json").write_text(json.dumps({"label_names": ["negative", "neutral", "positive"]}))
    return folder


def test_bench_end_to_end_resume_failure_and_report(tiny_model_dir, toy_task_dir, three_class_task, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--profile",
        "smoke",
        "--tasks",
        f"{toy_task_dir},{three_class_task}",
        "--methods",
        "lora,bitfit,miss",
        "--model",
        str(tiny_model_dir("bert")),
        "--out",
        str(out),
    ]

    assert main(argv) == 1  # the grid has failed cells (MiSS's r=64 on a 32-wide model), so the exit code says so
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert len(cells) == 6
    for task in ("toy", "toy3"):
        for method in ("lora", "bitfit"):
            cell = cells[f"{task}__{method}__seed0"]
            assert cell["status"] == "ok", cell["error"]
            assert cell["error"] is None
            assert 0 <= cell["validation"]["accuracy"] <= 1 and cell["test"]["accuracy"] is not None
            assert 0 < cell["trainable_params"] < cell["total_params"] and 0 < cell["trainable_pct"] < 100
            assert cell["adapter_bytes"] > 0 and cell["latency_ms_per_example"] > 0
            assert cell["peak_memory_mb"] >= 0 and cell["model_state_mb"] > 0
            assert cell["memory_kind"] == "process_peak_rss"
            assert cell["train_seconds"] > 0 and cell["train_examples_per_s"] > 0 and cell["steps"] == 8
            manifest = cell["manifest"]
            assert manifest["profile"] == "smoke" and manifest["command"].startswith("peftkit bench --profile smoke")
            assert manifest["config"]["train"]["max_steps"] == 8 and manifest["config"]["train"]["seed"] == 0
            assert manifest["config"]["method"]["name"] == method and "lr" in manifest["config"]["train"]
            assert {"torch", "transformers", "peft", "torch_threads", "cpu", "gpu"} <= set(cell["environment"])
            assert {"git_commit", "cpu_model", "cpu_count"} <= set(manifest)
        failed = cells[f"{task}__miss__seed0"]
        assert failed["status"] == "failed" and "could not be applied" in failed["error"]
        assert failed["manifest"]["config"]["method"]["name"] == "miss"
    assert cells["toy3__lora__seed0"]["task_metrics"] == ["accuracy", "macro_f1"]
    assert cells["toy__lora__seed0"]["task_metrics"] == ["accuracy", "f1"]
    # weights were measured, then dropped: the results folder stays small
    assert not list(out.rglob("*.safetensors"))
    assert max(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 1_000_000

    # the aggregates: every file, every column
    _check_report(out)
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    methods = ("lora", "bitfit", "miss")
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in ("toy", "toy3") for m in methods}
    lora = next(r for r in rows if r["task"] == "toy3" and r["method"] == "lora")
    for column in (
        "validation_accuracy_mean",
        "validation_macro_f1_mean",
        "test_accuracy_mean",
        "trainable_params",
        "trainable_pct",
        "adapter_mb",
        "peak_memory_mb",
        "model_state_mb",
        "train_seconds",
        "train_examples_per_s",
        "latency_ms_per_example",
        "lr",
    ):
        assert lora[column] not in ("", None), column
    assert lora["validation_f1_mean"] == ""  # binary F1 is not a metric of a 3-class task
    failing = next(r for r in rows if r["task"] == "toy" and r["method"] == "miss")
    assert failing["ok"] == "0" and "could not be applied" in failing["errors"]
    markdown = (out / "results.md").read_text()
    for text in (
        "## Summary",
        "## Budgets",
        "## toy",
        "## toy3",
        "## Failed cells\n\nRunning the same bench command again runs these cells again.",
        "trainable %",
        "peak mem MB",
        "latency ms",
        "plots/toy-params.png",
    ):
        assert text in markdown, text

    # resume: the ok cells are done and not rewritten; the failed ones run again (a failure may be transient)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    capsys.readouterr()
    assert main(argv) == 1
    assert "6 cells (4 already done, 2 run now: 2 retried after failing before), 2 failed" in capsys.readouterr().out
    rewritten = {p.stem for p in (out / "cells").glob("*.json") if p.stat().st_mtime_ns != mtimes[p]}
    assert rewritten == {"toy__miss__seed0", "toy3__miss__seed0"}

    # a done cell counts only for the config it ran: another model or profile into this folder is refused
    other_model = str(tiny_model_dir("gpt2"))
    capsys.readouterr()
    for flag, value, key in (
        ("--model", other_model, "model.name_or_path"),
        ("--profile", "quick", ""),
    ):
        assert main([*argv, flag, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "was run with another config (" + key in err and "another --out" in err
    assert {p.stem for p in (out / "cells").glob("*.json") if p.stat().st_mtime_ns != mtimes[p]} == rewritten

    # --report rebuilds tables and plots from the cell files alone
    for name in ("results.json", "results.csv", "results.md", "index.html"):
        (out / name).unlink()
    for png in (out / "plots").glob("*.png"):
        png.unlink()
    assert main(["bench", "--report", str(out)]) == 0
    _check_report(out)


def _check_report(out: Path) -> None:
    for name in ("results.json", "results.csv", "results.md", "index.html"):
        assert (out / name).stat().st_size > 0, name
    # 2 tasks x (params, memory, and the curves each cell's evaluations draw: against time and examples seen)
    assert (out / "index.html").read_text().count("data:image/png;base64,") == 8
    for task in ("toy", "toy3"):
        for kind in ("params", "memory", "curve-time", "curve-examples"):
            assert (out / "plots" / f"{task}-{kind}.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "results.json").read_text())
    assert {"profiles", "environment", "budgets", "summary", "rows", "cells"} <= set(report)
    assert report["budgets"]["toy"]["steps"] == 8 and report["summary"]["lora"]["toy"]["metric"] == "accuracy"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile", "nightly"], "unknown bench profile 'nightly'"),
        (["--methods", "lorra", "--tasks", "sst2"], "Did you mean 'lora'"),
        (["--tasks", "sst3", "--methods", "lora"], "unknown task"),
        (["--seeds", "zero"], "--seeds must be comma-separated integers"),
    ],
)
def test_bench_rejects_bad_choices_before_training(args, message, tmp_path, capsys):
    assert main(["bench", "--profile", "smoke", *args, "--out", str(tmp_path / "out")]) == 2  # the last --profile wins
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_task_folder_in_the_data_dir_is_named_by_its_name(toy_task_dir, tmp_path, monkeypatch):
    """load_task finds <data dir>/<name>/ by name; the grid's check refused it as an unknown task."""
    from peftkit.bench.grid import validate_choices
    from peftkit.errors import PeftkitError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PEFTKIT_DATA", raising=False)
    with pytest.raises(PeftkitError, match="unknown task"):
        validate_choices(["toy"], ["lora"])
    assert validate_choices(["toy"], ["lora"], str(toy_task_dir.parent)) == ["lora"]  # --data-dir
    with pytest.raises(PeftkitError, match="Did you mean 'toy'"):  # the folder's tasks are among the choices
        validate_choices(["toyy"], ["lora"], str(toy_task_dir.parent))
    monkeypatch.setenv("PEFTKIT_DATA", str(toy_task_dir.parent))
    assert validate_choices(["toy"], ["lora"]) == ["lora"]


def test_a_relative_data_dir_is_recorded_absolute_in_the_cells(toy_task_dir, tmp_path, monkeypatch):
    """bench --data-dir rel/ (and a relative $PEFTKIT_DATA) went into every cell's config and manifest as typed:
    an executor training in another folder, or a reader of the cell files elsewhere, found another folder."""
    import shutil

    from peftkit.bench import run_bench

    shutil.copytree(toy_task_dir, tmp_path / "data" / "toy")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PEFTKIT_DATA", "data")
    jobs = []

    class NotRun:  # records each job, trains nothing
        def run(self, cells):
            for job in cells:
                jobs.append(job)
                yield job, {"kind": "peftkit", "payload": "not run", "seconds": 0.0}

    run_bench("smoke", ["toy"], ["lora"], [0], "out", data_dir="data", progress=False, executor=NotRun())
    assert jobs and jobs[0].config["task"]["data_dir"] == str(tmp_path / "data")
    manifest = json.loads((tmp_path / "out" / "cells" / "toy__lora__seed0.json").read_text())["manifest"]
    assert manifest["config"]["task"]["data_dir"] == manifest["peftkit_data"] == str(tmp_path / "data")


def test_a_second_bench_on_a_folder_in_use_stops_naming_the_holder(toy_task_dir, tmp_path, capsys):
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    argv = ["bench", "--profile", "smoke", "--tasks", str(toy_task_dir), "--methods", "lora", "--out", str(out)]
    with open(out / ".bench.lock", "w") as held:  # what a running bench holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} is in use by another peftkit bench (pid {os.getpid()})" in err
    assert not (out / "cells").exists()


def test_an_interrupted_bench_writes_the_tables_of_the_cells_done(toy_task_dir, tmp_path, monkeypatch, capsys):
    class InterruptedAfterOneCell:  # the first cell finishes (failed, to stay fast), then Ctrl-C
        def run(self, jobs):
            yield jobs[0], {"kind": "peftkit", "payload": "boom", "seconds": 0.0}
            raise KeyboardInterrupt

    monkeypatch.setattr("peftkit.bench.executors.make_executor", lambda *a: InterruptedAfterOneCell())
    out = tmp_path / "out"
    argv = ["bench", "--profile", "smoke", "--tasks", str(toy_task_dir), "--methods", "lora,bitfit", "--out", str(out)]
    assert main([*argv, "--seeds", "0,1"]) == 130
    assert len(list((out / "cells").glob("*.json"))) == 1
    assert json.loads((out / "results.json").read_text())["missing_cells"] == 3
    markdown = (out / "results.md").read_text()
    assert "so 3 planned cells have no result" in markdown and "toy__lora__seed0" in markdown
    assert "so 3 planned cells have no result" in (out / "index.html").read_text()
    assert "stopped with 3 planned cells missing" in capsys.readouterr().err


def test_without_fcntl_the_bench_runs_unlocked_and_warns(tmp_path, monkeypatch, capsys):
    import sys

    from peftkit.bench.processes import folder_lock

    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` fails, as on Windows
    with folder_lock(tmp_path / "out"):
        pass
    assert "no fcntl file locks, so nothing stops a second bench" in capsys.readouterr().err


def test_report_of_an_empty_folder_is_a_user_error(tmp_path, capsys):
    assert main(["bench", "--report", str(tmp_path)]) == 2
    assert "no cell results" in capsys.readouterr().err


def test_report_refuses_flags_it_would_ignore(tmp_path, capsys):
    """--report writes into DIR itself: --out (or a grid flag) beside it was silently dropped."""
    assert main(["bench", "--report", str(tmp_path), "--out", str(tmp_path / "elsewhere"), "--tasks", "sst2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tasks, --out cannot be combined with --report" in err
    assert not (tmp_path / "elsewhere").exists()


def test_report_of_an_incomplete_cell_file_names_it_and_the_missing_keys(tmp_path, capsys):
    (tmp_path / "cells").mkdir()
    cell = tmp_path / "cells" / "t__lora__seed0.json"
    cell.write_text(json.dumps({"cell": "t__lora__seed0", "method": "lora", "seed": 0, "status": "failed"}))
    assert main(["bench", "--report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"peftkit: error: cell file {cell} lacks task, manifest, error; remove it to run the cell again\n"


def test_aggregate_means_stds_and_pareto(tmp_path):
    def cell(seed: int, accuracy: float, params: int) -> dict:
        return {
            "cell": f"t__lora__seed{seed}",
            "task": "t",
            "method": "lora",
            "seed": seed,
            "status": "ok",
            "error": None,
            "task_metrics": ["accuracy"],
            "validation": {"accuracy": accuracy},
            "test": None,
            "trainable_params": params,
            "trainable_pct": 1.0,
            "adapter_bytes": 2**20,
            "peak_memory_mb": 10.0,
            "model_state_mb": 5.0,
            "train_seconds": 1.0,
            "train_examples_per_s": 2.0,
            "latency_ms_per_example": 0.5,
            "memory_kind": "process_peak_rss",
            "steps": 3,
            "manifest": {"config": {"train": {"lr": 1e-3}}},
        }

    [row] = aggregate([cell(0, 0.80, 100), cell(1, 0.90, 100)])
    assert row["validation_accuracy_mean"] == pytest.approx(0.85)
    assert row["validation_accuracy_std"] == pytest.approx(0.0707, abs=1e-4)
    assert row["adapter_mb"] == pytest.approx(1.0) and row["seeds"] == [0, 1]
    # (params, accuracy): the 3rd point is beaten by the 2nd (fewer params, higher accuracy)
    assert pareto_front([(10, 0.5), (100, 0.8), (1000, 0.7), (5, 0.4)]) == [3, 0, 1]


def test_profiles_cover_the_grid():
    quick = load_profile("quick")
    assert len(quick.tasks) == 5 and "head" in quick.methods and len(quick.methods) == 9 and quick.seeds == (0,)
    assert not quick.more_seeds and quick.overrides_for("sst2", "lora")[-1] == "train.lr=2e-3"
    converged = load_profile("converged")
    assert converged.seeds == (0, 1, 2) and set(converged.lr_grid) == set(converged.methods)
    assert all(len(grid) == 3 and sorted(grid) == list(grid) for grid in converged.lr_grid.values())
    assert any(o.startswith("task.dev_size=") for o in converged.overrides)
    assert any(o.startswith("train.patience=") for o in converged.overrides)
    assert load_profile("full").seeds == (0, 1, 2) and load_profile("full").bf16_on_cuda
    for profile in map(load_profile, available_profiles()):
        assert all(o.count("=") >= 1 and o.split("=")[0].count(".") == 1 for o in profile.overrides)


@pytest.mark.parametrize("key", ["lr_grid", "method_overrides", "methods", "exclude_methods"])
def test_a_profile_naming_an_unknown_method_is_refused(key, tmp_path, monkeypatch):
    """A misspelt method key (lr_grid: {lorra: ...}) was read by no cell: the grid ran lora at the recipe's lr."""
    from peftkit.bench import profiles
    from peftkit.errors import PeftkitError

    value = "{lorra: [1e-3]}" if key in ("lr_grid", "method_overrides") else "[lorra]"
    (tmp_path / "mine.yaml").write_text(f"description: mine\nseeds: [0]\n{key}: {value}\n")
    monkeypatch.setattr(profiles, "profiles_dir", lambda: tmp_path)
    with pytest.raises(PeftkitError, match=f"unknown method in bench profile mine.{key} 'lorra'. Did you mean 'lora'"):
        load_profile("mine")


def test_a_users_profile_file_is_read_from_its_path_and_named_by_its_stem(tmp_path, monkeypatch, capsys):
    """--profile took only built-in names, so a user had to write into the installed package's profile folder."""
    from peftkit.errors import PeftkitError

    (tmp_path / "my-grid.yaml").write_text("description: mine\nseeds: [0, 1]\nmethods: [lora]\n")
    monkeypatch.chdir(tmp_path)
    profile = load_profile("my-grid.yaml")
    assert (profile.name, profile.seeds, profile.methods) == ("my-grid", (0, 1), ("lora",))
    with pytest.raises(PeftkitError, match="bench profile file nope.yaml does not exist"):
        load_profile("nope.yaml")
    assert main(["bench", "--profile", "nope.yaml"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_learning_rate_grid_without_a_dev_split_stops_before_training(toy_task_dir, tmp_path, monkeypatch, capsys):
    """Without task.dev_size no grid cell had a dev score: nothing was chosen, no seed ran, and the exit code was 0."""
    import peftkit.bench.profiles as profiles

    (tmp_path / "grid.yaml").write_text("description: no dev\nseeds: [0, 1]\nlr_grid: {lora: [1e-3, 5e-2]}\n")
    monkeypatch.setattr(profiles, "profiles_dir", lambda: tmp_path)
    out = tmp_path / "bench"
    assert (
        main(["bench", "--profile", "grid", "--tasks", str(toy_task_dir), "--methods", "lora", "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task toy sets no task.dev_size: add e.g. task.dev_size=0.1" in err
    assert not (out / "cells").exists()


def test_a_profile_override_no_cell_can_take_stops_before_training(toy_task_dir, tmp_path, monkeypatch, capsys):
    """A misspelt key in a profile's overrides failed every cell in turn, each after loading its model."""
    import peftkit.bench.profiles as profiles

    (tmp_path / "typo.yaml").write_text("description: typo\nseeds: [0]\noverrides: [train.max_stepz=2]\n")
    monkeypatch.setattr(profiles, "profiles_dir", lambda: tmp_path)
    out = tmp_path / "bench"
    argv = ["bench", "--profile", "typo", "--tasks", str(toy_task_dir), "--methods", "lora,head", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bench profile typo, cell toy__lora__seed0: " in err and "max_stepz" in err
    assert not (out / "cells").exists()


def test_learning_rate_grid_chooses_on_dev_then_runs_the_other_seeds(
    tiny_model_dir, toy_task_dir, tmp_path, monkeypatch, capsys
):
    import peftkit.bench.profiles as profiles

    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "grid.yaml").write_text(
        "description: a learning-rate grid on a dev split\n"
        "seeds: [0, 1]\n"
        "overrides: [train.max_steps=4, train.eval_every=2, train.batch_size=8, task.dev_size=0.25,"
        " train.bf16=false, task.max_length=32]\n"
        "lr_grid: {lora: [1e-3, 5e-2]}\n"
        "latency_examples: 8\nlatency_batch_size: 8\n"
    )
    monkeypatch.setattr(profiles, "profiles_dir", lambda: folder)
    out = tmp_path / "bench"
    argv = ["bench", "--profile", "grid", "--tasks", str(toy_task_dir), "--methods", "lora"]
    argv += ["--model", str(tiny_model_dir("bert")), "--out", str(out)]
    assert main(argv) == 0
    selection = json.loads((out / "selection.json").read_text())
    choice = selection["tasks"]["toy"]["lora"]
    assert choice["metric"] == "accuracy" and set(choice["dev"]) == {"0.001", "0.05"}
    chosen = max(choice["dev"], key=lambda lr: choice["dev"][lr])  # ties: the first listed
    assert choice["chosen_lr"] == float(chosen)
    other = "0.05" if chosen == "0.001" else "0.001"
    ids = sorted(p.stem for p in (out / "cells").glob("*.json"))
    assert ids == sorted(
        [
            f"toy__lora__lr{chosen}__seed0",
            f"toy__lora__lr{chosen}__seed1",
            f"toy__lora__lr{other}__seed0",
        ]
    )
    assert "dev split carved from train" in selection["protocol"]
    cell = json.loads((out / "cells" / f"toy__lora__lr{chosen}__seed1.json").read_text())
    assert cell["selection_split"] == "dev" and cell["dev"]["accuracy"] is not None
    assert cell["grid_lr"] == float(chosen) == cell["manifest"]["config"]["train"]["lr"]
    assert [e["split"] for e in cell["curve"]] == ["dev", "dev"] and cell["curve"][-1]["examples_seen"] == 32
    labels = [json.loads(line)["label"] for line in (toy_task_dir / "validation.jsonl").read_text().splitlines()]
    assert cell["majority_rate"] in {labels.count(label) / len(labels) for label in labels}  # one label's share
    rows = json.loads((out / "results.json").read_text())["rows"]
    lora = next(r for r in rows if r["method"] == "lora")
    assert lora["ok"] == 2  # the two seeds at the chosen rate; the grid's other cell is not reported
    environment = json.loads((out / "results.json").read_text())["environment"]
    assert sum(environment["machines"].values()) == 3  # ... but its run is counted with its machine and command
    assert [c["cells"] for c in environment["commands"]] == [3]
    capsys.readouterr()
    assert main(["bench", "--report", str(out)]) == 0
    assert "from 3 cell files (2 at the chosen learning rates)" in capsys.readouterr().out
    # resume: nothing reruns
    assert main(argv) == 0
    assert "3 cells (3 already done, 0 run now)" in capsys.readouterr().out


def test_a_grid_run_in_sittings_keeps_every_pairs_choice(tiny_model_dir, toy_task_dir, tmp_path, monkeypatch):
    """Two subsets run one after the other into one folder: selection.json holds both choices, and the report
    counts each pair's seeds at its chosen rate only (not the other grid cells as extra seeds)."""
    import peftkit.bench.profiles as profiles

    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "grid.yaml").write_text(
        "description: a learning-rate grid run in two sittings\n"
        "seeds: [0, 1]\n"
        "overrides: [train.max_steps=2, train.eval_every=2, train.batch_size=8, task.dev_size=0.25,"
        " train.bf16=false, task.max_length=32]\n"
        "lr_grid: {lora: [1e-3, 5e-2], bitfit: [1e-3, 5e-2]}\n"
        "latency_examples: 8\nlatency_batch_size: 8\n"
    )
    monkeypatch.setattr(profiles, "profiles_dir", lambda: folder)
    out = tmp_path / "bench"
    base = ["bench", "--profile", "grid", "--tasks", str(toy_task_dir), "--model", str(tiny_model_dir("bert"))]
    for method in ("lora", "bitfit"):
        assert main([*base, "--methods", method, "--out", str(out)]) == 0
    chosen = json.loads((out / "selection.json").read_text())["tasks"]["toy"]
    assert set(chosen) == {"lora", "bitfit"}
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["method"]: r["ok"] for r in rows} == {"lora": 2, "bitfit": 2}


def test_report_without_a_selection_entry_keeps_the_rate_the_grid_cells_chose():
    """Cells copied in from another sitting's folder without their selection.json entry: the report reads the
    choice back from the grid's seed-0 dev scores instead of averaging every grid rate as if it were a seed."""
    from peftkit.bench.selection import reported_cells

    def cell(method, lr, seed, dev):
        return {"task": "toy", "method": method, "grid_lr": lr, "seed": seed, "status": "ok",
                "task_metrics": ["accuracy"], "dev": {"accuracy": dev}}  # fmt: skip

    grid = [cell("lora", 1e-3, 0, 0.70), cell("lora", 3e-3, 0, 0.80), cell("lora", 1e-2, 0, 0.60)]
    seeds = [cell("lora", 3e-3, 1, 0.50), cell("lora", 3e-3, 2, 0.90)]  # seeds' dev scores never choose
    tied = [cell("bitfit", 1e-3, 0, 0.75), cell("bitfit", 3e-3, 0, 0.75)]  # a tie goes to the smaller rate
    kept = reported_cells(grid + seeds + tied, None)
    assert sorted((c["method"], c["grid_lr"], c["seed"]) for c in kept) == [
        ("bitfit", 1e-3, 0),
        ("lora", 3e-3, 0),
        ("lora", 3e-3, 1),
        ("lora", 3e-3, 2),
    ]
    selection = {"tasks": {"toy": {"lora": {"chosen_lr": 1e-3}}}}  # selection.json, where it names a pair, wins
    kept = reported_cells(grid + seeds, selection)
    assert [(c["grid_lr"], c["seed"]) for c in kept] == [(1e-3, 0)]
