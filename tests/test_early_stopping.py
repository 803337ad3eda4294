"""Converged runs: early stopping (train.patience, train.max_epochs) and a dev split carved from train."""

from __future__ import annotations

import json
import shutil

import pytest

from peftkit.config import RunConfig, TaskConfig
from peftkit.data import load_task, majority_rate
from peftkit.errors import PeftkitError
from peftkit.loop import train


def evaluations(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' in line]


def test_patience_stops_after_evaluations_without_improvement(tiny_run_config, tmp_path):
    # a learning rate too small to move any prediction: the first evaluation stays the best
    config = tiny_run_config("lora", max_steps=20, eval_every=1, patience=2, lr=1e-12, head_lr=1e-12)
    summary = train(config, run_dir=tmp_path / "run")
    assert summary.stopped_early
    assert summary.steps == 3  # best at step 1, no improvement at 2 and 3
    assert summary.best["step"] == 1
    assert [e["step"] for e in evaluations(tmp_path / "run")] == [1, 2, 3]


def test_resuming_an_early_stopped_run_finishes_it_without_more_steps(tiny_run_config, tmp_path):
    still = dict(lr=1e-12, head_lr=1e-12)  # the first evaluation stays the best: stopped at step 3
    config = tiny_run_config("lora", max_steps=20, eval_every=1, patience=2, checkpoint_every=1, **still)
    straight = train(config, run_dir=tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()  # killed after the checkpoint of the stop step, before the end
    shutil.rmtree(tmp_path / "run" / "adapter")
    resumed = train(config, resume=tmp_path / "run")
    assert resumed.stopped_early and resumed.steps == straight.steps == 3
    assert (resumed.final, resumed.best) == (straight.final, straight.best)
    assert [e["step"] for e in evaluations(tmp_path / "run")] == [1, 2, 3]
    with pytest.raises(PeftkitError, match="is a finished run"):
        train(config, resume=tmp_path / "run")


def test_without_patience_the_run_goes_to_its_last_step(tiny_run_config, tmp_path):
    config = tiny_run_config("lora", max_steps=5, eval_every=1, lr=1e-12, head_lr=1e-12)
    summary = train(config, run_dir=tmp_path / "run")
    assert not summary.stopped_early and summary.steps == 5


def test_max_epochs_is_the_schedule_and_patience_evaluates_every_epoch(tiny_run_config, tmp_path):
    # 96 toy train rows at batch 8: 12 steps an epoch
    config = tiny_run_config("lora", max_steps=None, epochs=1, max_epochs=2, patience=5)
    summary = train(config, run_dir=tmp_path / "run")
    assert summary.steps == 24
    assert [e["step"] for e in evaluations(tmp_path / "run")] == [12, 24]


def test_without_patience_epochs_is_the_budget_and_max_epochs_drops_out(tiny_run_config, tmp_path):
    # a recipe's max_epochs with train.patience=null: early stopping's ceiling is gone, train.epochs counts
    config = tiny_run_config("lora", max_steps=None, epochs=1, max_epochs=3, patience=None)
    assert train(config, run_dir=tmp_path / "run").steps == 12


def test_an_epoch_budget_override_that_would_be_ignored_is_refused():
    from peftkit.recipe_files import load_config

    assert load_config("sst2-lora").train.budget_epochs() == 3  # the recipe's max_epochs, under its patience
    assert load_config("sst2-lora", overrides=["train.epochs=1", "train.patience=null"]).train.budget_epochs() == 1
    with pytest.raises(PeftkitError, match="set train.max_epochs=2 instead"):
        load_config("sst2-lora", overrides=["train.epochs=2"])
    with pytest.raises(PeftkitError, match="set train.epochs=5 instead"):
        load_config("sst2-lora", overrides=["train.patience=null", "train.max_epochs=5"])


def test_evaluations_record_examples_seen_and_train_seconds(tiny_run_config, tmp_path):
    train(tiny_run_config("lora", max_steps=4, eval_every=2), run_dir=tmp_path / "run")
    evals = evaluations(tmp_path / "run")
    assert [e["examples_seen"] for e in evals] == [16, 32]
    assert 0 < evals[0]["train_seconds"] <= evals[1]["train_seconds"]


def test_dev_split_is_selected_on_and_validation_stays_held_out(tiny_run_config, tmp_path):
    config = tiny_run_config("lora", max_steps=4, eval_every=2)
    config.task.dev_size = 0.25
    summary = train(config, run_dir=tmp_path / "run")
    assert {e["split"] for e in evaluations(tmp_path / "run")} == {"dev"}
    assert summary.selection_split == "dev"
    assert summary.train_examples == 72  # 96 - 24 dev rows
    assert summary.validation is not None and set(summary.validation) >= {"accuracy", "loss"}
    saved = json.loads((tmp_path / "run" / "adapter" / "peftkit.json").read_text())
    assert saved["metrics"]["validation"] == summary.validation  # the adapter reports held-out numbers


def test_dev_rows_are_the_same_for_every_seed_and_never_in_train(toy_task_dir):
    budget = TaskConfig(name=str(toy_task_dir), dev_size=20, max_train_examples=50)
    first, second = load_task(budget, seed=0), load_task(budget, seed=1)
    assert first.splits["dev"] == second.splits["dev"] and len(first.splits["dev"]) == 20
    assert first.splits["train"] != second.splits["train"]  # the train subsample still follows the seed
    whole = load_task(TaskConfig(name=str(toy_task_dir), dev_size=20), seed=0)
    assert len(whole.splits["train"]) == 76
    assert not {id(r) for r in whole.splits["dev"]} & {id(r) for r in whole.splits["train"]}


@pytest.mark.parametrize(
    "dev_size, message",
    [
        (0.0, "task.dev_size must be above 0"),
        (2.5, "whole number of rows"),
        (96, r"leaves no training rows \(train has 96\); give a share of train \(e.g. task.dev_size=0.1\)"),
    ],
)
def test_bad_dev_sizes_are_clear_errors(toy_task_dir, dev_size, message):
    with pytest.raises(PeftkitError, match=message):
        data = {"task": {"name": str(toy_task_dir), "dev_size": dev_size}, "method": {"name": "lora"}}
        load_task(RunConfig.from_dict(data).task)


def test_majority_rate_scores_the_training_majority_on_the_evaluated_split():
    assert majority_rate([0, 1, 1, 1], [1, 0, 1, 1]) == 0.75
    assert majority_rate([1, 1, 0], [0, 0, 0]) == 0.0  # not the evaluated split's own commonest label (1.0)
    assert majority_rate([2, 1, 2, 1], [1, 2, 2]) == 1 / 3  # a tie goes to the lowest id


def test_summary_reports_the_majority_rate(tiny_run_config, tmp_path, toy_task_dir):
    summary = train(tiny_run_config("lora", max_steps=1), run_dir=tmp_path / "run")
    labels = {
        split: [json.loads(line)["label"] for line in (toy_task_dir / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "validation")
    }
    assert summary.majority_rate == majority_rate(labels["train"], labels["validation"])


def test_a_run_killed_between_evaluations_without_improvement_stops_where_it_would_have(
    tiny_run_config, tmp_path, monkeypatch
):
    from peftkit.adapters.lora import LoRA

    # the first evaluation stays the best: no improvement at 2, 3, 4 -> stopped at step 4 (patience 3)
    still = dict(lr=1e-12, head_lr=1e-12)
    config = tiny_run_config("lora", max_steps=20, eval_every=1, patience=3, checkpoint_every=2, **still)
    straight = train(config, run_dir=tmp_path / "straight")
    original = LoRA.after_optimizer_step

    def crash(self, model, step):
        if step == 2:  # taking step 3: after the checkpoint of step 2, which counts one evaluation without improvement
            raise RuntimeError("simulated crash")
        return original(self, model, step)

    monkeypatch.setattr(LoRA, "after_optimizer_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, run_dir=tmp_path / "crashed")
    monkeypatch.setattr(LoRA, "after_optimizer_step", original)
    resumed = train(config, resume=tmp_path / "crashed")
    assert straight.stopped_early and resumed.stopped_early and resumed.steps == straight.steps == 4
    assert resumed.best == straight.best and resumed.best["step"] == 1
    assert [e["step"] for e in evaluations(tmp_path / "crashed")] == [1, 2, 3, 4]
