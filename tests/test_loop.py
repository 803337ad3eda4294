"""The shared loop: exact resume, accumulation, head learning rate, run folder contents, evaluation kept best."""

from __future__ import annotations

import json

import pytest
import torch

from peftkit.adapters.lora import LoRA
from peftkit.io import load_tensors
from peftkit.loop import BatchOrder, Ranks, build_optimizer, train


def adapter_weights(run_dir):
    return load_tensors(run_dir / "adapter" / "adapter_model.safetensors")


def test_run_folder_has_config_metrics_summary_adapter(tiny_run_config, tmp_path):
    summary = train(tiny_run_config("lora", eval_every=2), run_dir=tmp_path / "run")
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "adapter"} <= {p.name for p in run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "peftkit.json"} <= {
        p.name for p in (run / "adapter").iterdir()
    }
    saved = json.loads((run / "summary.json").read_text())
    assert saved["trainable_params"] == summary.trainable_params > 0
    for key in (
        "final",
        "best",
        "test",
        "trainable_pct",
        "peak_memory_mb",
        "train_seconds",
        "train_examples_per_s",
        "environment",
        "seed",
    ):
        assert key in saved, key
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"split"' in line]
    assert [e["step"] for e in evals] == [2, 4]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")], "a temp file was left behind"


def test_same_seed_same_weights_other_seed_differs(tiny_run_config, tmp_path):
    train(tiny_run_config("lora", seed=1), run_dir=tmp_path / "a")
    train(tiny_run_config("lora", seed=1), run_dir=tmp_path / "b")
    train(tiny_run_config("lora", seed=2), run_dir=tmp_path / "c")
    a, b, c = (adapter_weights(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_peftkit_train_stays_the_function_once_the_loop_module_is_imported(tiny_run_config, tmp_path):
    """The loop lived in peftkit/train.py: importing it bound the module over the function `peftkit.train`, so a
    second `peftkit.train(config)` in one process was TypeError: 'module' object is not callable."""
    import peftkit
    import peftkit.loop  # noqa: F401  (binds the submodule on the package, as any import of it does)

    for name in "ab":
        assert peftkit.train(tiny_run_config("lora", max_steps=1), run_dir=tmp_path / name).steps == 1


def test_resume_after_crash_is_bitwise_identical(tiny_run_config, tmp_path, monkeypatch):
    steps = dict(max_steps=8, checkpoint_every=3, eval_every=4)
    train(tiny_run_config("lora", **steps), run_dir=tmp_path / "straight")

    original = LoRA.after_optimizer_step

    def crash_at_step_5(self, model, step):
        if step == 4:  # after the checkpoint at step 3, in the middle of the run
            raise RuntimeError("simulated crash")
        return original(self, model, step)

    monkeypatch.setattr(LoRA, "after_optimizer_step", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_run_config("lora", **steps), run_dir=tmp_path / "crashed")
    assert not (tmp_path / "crashed" / "adapter").exists()
    monkeypatch.setattr(LoRA, "after_optimizer_step", original)

    summary = train(tiny_run_config("lora", **steps), resume=tmp_path / "crashed")
    straight, resumed = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "crashed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert summary.steps == 8
    steps_logged = [
        json.loads(line)["step"]
        for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
        if "task_loss" in line
    ]
    assert steps_logged == list(range(1, 9)), "the resumed log must not repeat or skip steps"


def test_gradient_accumulation_equals_the_bigger_batch(tiny_run_config, tiny_model_dir, tmp_path):
    """Without dropout, 2 accumulated batches of 4 give the same update as one batch of 8 (same rows, same order)."""
    still = str(tiny_model_dir("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    runs = {}
    for name, train_opts in (("big", dict(batch_size=8)), ("accum", dict(batch_size=4, grad_accum_steps=2))):
        config = tiny_run_config(
            "lora", method_options={"dropout": 0.0}, max_steps=3, batching="random", bf16=False, **train_opts
        )
        config.model.name_or_path = still
        train(config, run_dir=tmp_path / name)
        runs[name] = adapter_weights(tmp_path / name)
    big, accum = runs["big"], runs["accum"]
    assert big.keys() == accum.keys()
    # 1e-5: Adam divides by sqrt(v), so float rounding in near-zero gradients (the trained pooler's) moves a weight
    # by up to ~lr * 1e-3 (seen: 5.5e-6 at lr 1e-2); a real accumulation bug moves weights by ~lr
    differ = {
        k: (big[k] - accum[k]).abs().max().item() for k in big if not torch.allclose(big[k], accum[k], atol=1e-5)
    }
    assert not differ, differ
    assert any(not torch.equal(big[k], torch.zeros_like(big[k])) for k in big if "lora_B" in k)


def test_an_accumulation_ends_with_its_epoch(tiny_run_config, tiny_model_dir, tmp_path):
    """14 batches of 7 (the last of 5 rows) in 5s: the epoch's last step takes the 4 batches left, each row weighing
    the same, so one epoch sees each row once and equals 3 steps of 35 rows (random batching cuts one permutation
    either way)."""
    still = str(tiny_model_dir("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    runs = {}
    for name, train_opts in (("big", dict(batch_size=35)), ("accum", dict(batch_size=7, grad_accum_steps=5))):
        config = tiny_run_config(
            "lora", method_options={"dropout": 0.0}, max_steps=None, batching="random", bf16=False, **train_opts
        )
        config.model.name_or_path = still
        summary = train(config, run_dir=tmp_path / name)
        assert (summary.steps, summary.examples_seen) == (3, 96)
        runs[name] = adapter_weights(tmp_path / name)
    big, accum = runs["big"], runs["accum"]
    assert all(torch.allclose(big[k], accum[k], atol=1e-5) for k in big)


def test_batch_order_is_a_permutation_and_ranks_do_not_overlap():
    from peftkit.checkpoint import TrainState

    state = TrainState()
    order = BatchOrder(10, 3, seed=0, ranks=Ranks())
    seen = [i for _ in range(order.batches_per_epoch) for i in order.next(state)]
    assert sorted(seen) == list(range(10))
    s0, s1 = TrainState(), TrainState()
    r0, r1 = BatchOrder(12, 3, 0, Ranks(0, 2, 0)), BatchOrder(12, 3, 0, Ranks(1, 2, 1))
    rows0 = [i for _ in range(r0.batches_per_epoch) for i in r0.next(s0)]
    rows1 = [i for _ in range(r1.batches_per_epoch) for i in r1.next(s1)]
    assert not set(rows0) & set(rows1) and sorted(rows0 + rows1) == list(range(12))


def test_head_gets_its_own_learning_rate(tiny_model_dir):
    from peftkit.adapters import MethodContext, build_method
    from peftkit.config import ModelConfig, TrainConfig
    from peftkit.modeling import load_model

    model = build_method("lora").apply(
        load_model(ModelConfig(str(tiny_model_dir("bert"))), 2, 0), MethodContext("x", ["classifier"])
    )
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, head_lr=3e-3), ["classifier"])
    by_lr = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            by_lr.setdefault(group["lr"], []).append(names[id(p)])
    assert set(by_lr) == {1e-4, 3e-3}
    assert all("classifier" in n for n in by_lr[3e-3]) and not any("classifier" in n for n in by_lr[1e-4])


def test_bf16_autocast_trains_on_cpu(tiny_run_config, tmp_path):
    summary = train(tiny_run_config("lora", bf16=True), run_dir=tmp_path / "run")
    assert summary.bf16 is True and summary.steps == 4


def test_written_files_follow_the_umask_not_mkstemp_0600(tiny_run_config, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        train(tiny_run_config("bottleneck"), run_dir=tmp_path / "run")
    finally:
        os.umask(old)
    for path in (
        tmp_path / "run" / "adapter",
        tmp_path / "run" / "adapter" / "peftkit.json",
        tmp_path / "run" / "summary.json",
    ):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path  # group/other can read a shipped adapter


@pytest.mark.parametrize(
    "override, message",
    [
        ({"log_every": 0}, "train.log_every must be at least 1"),
        ({"batch_size": 0}, "train.batch_size must be at least 1"),
        ({"eval_every": 0}, "use null to turn it off"),
    ],
)
def test_zero_budgets_are_clear_errors(tiny_run_config, tmp_path, override, message):
    from peftkit.errors import PeftkitError

    with pytest.raises(PeftkitError, match=message):
        train(tiny_run_config("lora", **override), run_dir=tmp_path / "run")


def test_adalora_refuses_checkpoints_it_could_not_resume_exactly(tiny_run_config, tmp_path):
    from peftkit.errors import PeftkitError

    config = tiny_run_config("adalora", method_options={"tinit_ratio": 0.0, "tfinal_ratio": 0.0}, checkpoint_every=2)
    with pytest.raises(PeftkitError, match="rank allocator"):
        train(config, run_dir=tmp_path / "run")


def test_resume_past_the_budget_is_a_clear_error(tiny_run_config, tmp_path):
    from peftkit.errors import PeftkitError

    train(tiny_run_config("lora", max_steps=4, checkpoint_every=3), run_dir=tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()  # a finished run is refused before its budget is read
    with pytest.raises(PeftkitError, match="already at step 3"):
        train(tiny_run_config("lora", max_steps=2, checkpoint_every=3), resume=tmp_path / "run")


def test_logged_loss_after_resume_is_the_uninterrupted_runs(tiny_run_config, tmp_path, monkeypatch):
    from peftkit.adapters.lora import LoRA

    steps = dict(max_steps=8, checkpoint_every=3, log_every=4)
    train(tiny_run_config("lora", **steps), run_dir=tmp_path / "straight")
    original = LoRA.after_optimizer_step

    def crash(self, model, step):
        if step == 4:
            raise RuntimeError("crash")
        return original(self, model, step)

    monkeypatch.setattr(LoRA, "after_optimizer_step", crash)
    with pytest.raises(RuntimeError):
        train(tiny_run_config("lora", **steps), run_dir=tmp_path / "crashed")
    monkeypatch.setattr(LoRA, "after_optimizer_step", original)
    train(tiny_run_config("lora", **steps), resume=tmp_path / "crashed")

    def logged(run):
        return {
            r["step"]: r["task_loss"]
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "task_loss" in r
        }

    straight, resumed = logged(tmp_path / "straight"), logged(tmp_path / "crashed")
    assert resumed == straight  # the window open at the checkpoint (step 3 of 1..4) is in it


def test_binary_f1_as_best_metric_on_three_labels_is_a_clear_error(tiny_run_config, tmp_path):
    from peftkit.errors import PeftkitError

    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 3}) + "\n" for i in range(30)))
    config = tiny_run_config("lora", metric_for_best="f1")
    config.task.name = str(path)
    with pytest.raises(PeftkitError, match="has 3 labels, use macro_f1"):
        train(config, run_dir=tmp_path / "run")


def test_kill_resume_bench_counts_a_run_that_finished_before_the_kill(tiny_run_config, tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_resume.py"
    spec = importlib.util.spec_from_file_location("kill_resume", script)
    kill_resume = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kill_resume)
    train(tiny_run_config("lora", max_steps=2, checkpoint_every=1), run_dir=tmp_path / "run")
    before = (tmp_path / "run" / "summary.json").read_bytes()
    # the kill landed after summary.json: --resume would refuse the finished run, which is not a failed trial
    how = kill_resume.continue_killed(tmp_path / "run", tmp_path / "unused.yaml")
    assert how == ("finished before the kill", None)
    assert (tmp_path / "run" / "summary.json").read_bytes() == before


def test_a_run_reads_its_relative_paths_from_any_folder(
    tiny_run_config, tiny_model_dir, toy_task_dir, tmp_path, monkeypatch
):
    """Relative task and model paths are made absolute once the run starts: config.yaml and the adapter name the
    files the run read, so eval from another folder (even one holding a same-named task) reads those again."""
    import os
    import shutil

    from peftkit.artifacts import load
    from peftkit.inference import evaluate_run
    from peftkit.recipe_files import load_config

    shutil.copytree(toy_task_dir, tmp_path / "toy")
    monkeypatch.chdir(tmp_path)
    config = tiny_run_config("lora", max_steps=2)
    config.task.name, config.model.name_or_path = "toy", os.path.relpath(tiny_model_dir("bert"))
    train(config, run_dir=tmp_path / "run")
    saved = load_config(config_file=str(tmp_path / "run" / "config.yaml"))
    assert saved.task.name == str(tmp_path / "toy")
    assert load(tmp_path / "run" / "adapter").meta.base_model == str(tiny_model_dir("bert"))
    (tmp_path / "elsewhere" / "toy").mkdir(parents=True)
    (tmp_path / "elsewhere" / "toy" / "train.jsonl").write_text('{"text": "decoy", "label": "x"}\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert evaluate_run(tmp_path / "run", device="cpu").examples == 32


def test_resume_compares_local_paths_as_absolute(tmp_path, monkeypatch):
    """An older run's manifest holds the relative path as typed; resumed from the folder it was trained in, it is
    the same file as the absolute path a run now records; a built-in task name stays a name."""
    from peftkit.resume import changed_keys

    (tmp_path / "st.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    absolute = {"task.name": str(tmp_path / "st.jsonl"), "task.test_file": str(tmp_path / "t.jsonl")}
    assert changed_keys({"task.name": "st.jsonl", "task.test_file": "./t.jsonl"}, absolute) == []
    assert changed_keys({"task.name": "other.jsonl"}, absolute) == ["task.name", "task.test_file"]
    assert changed_keys({"task.name": "sst2"}, {"task.name": "sst2"}) == []
