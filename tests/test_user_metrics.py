"""`--metric`: Hugging Face `evaluate` modules users bring, on `peftkit eval` and `peftkit bench`.

Every module here is a local folder written by the test (evaluate cannot fetch anything offline). `evaluate` is
imported only inside tests, after conftest has pointed HF_HOME at a temporary folder, so its caches land there.
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import pytest
from tiny_runs import TinyRuns

from peftkit.bench.report_user_metrics import user_metric_means, user_metrics_section
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.user_metrics import load_user_metric, load_user_metrics, score_user_metric, score_user_metrics

pytestmark = pytest.mark.skipif(
    find_spec("evaluate") is None, reason="needs `evaluate` (pip install 'peftkit[metrics]')"
)

MODULE = """
import datasets
import evaluate


class {cls}(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="a test metric",
            citation="",
            features=datasets.Features(
                {{"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}}
            ),
        )

    def _compute(self, predictions, references):
{body}
"""
BALANCED_ERROR = """
from sklearn.metrics import balanced_accuracy_score

per_class = [sum(p == r == c for p, r in zip(predictions, references)) for c in (0, 1)]
return {"balanced_error": 1 - balanced_accuracy_score(references, predictions), "support": len(references),
        "per_class": per_class, "note": "lists and strings are left out"}
"""
ACCURACY = "return {'accuracy': sum(p == r for p, r in zip(predictions, references)) / len(references)}"


def write_module(root: Path, name: str, body: str) -> Path:
    """A local evaluate module folder: ROOT/NAME/NAME.py holding one evaluate.Metric subclass."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    code = MODULE.format(cls="".join(p.title() for p in name.split("_")), body=textwrap.indent(body.strip(), " " * 8))
    (folder / f"{name}.py").write_text(code)
    return folder


@pytest.fixture(scope="module")
def modules(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metrics")
    return {
        "balanced_error": write_module(root, "balanced_error", BALANCED_ERROR),
        "accuracy": write_module(root, "accuracy", ACCURACY),
    }


PREDICTIONS = [0, 1, 1, 0, 1, 1, 1, 0]
REFERENCES = [0, 1, 0, 0, 1, 1, 0, 1]


def test_local_module_scores_like_sklearn(modules):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    metric = load_user_metric(str(modules["balanced_error"]))
    assert metric.name == "balanced_error" and Path(metric.spec).is_absolute()
    scores = score_user_metric(metric, PREDICTIONS, REFERENCES)
    # numeric scalars only, named <module>:<key>; the list and the string are left out
    assert scores == {
        "balanced_error:balanced_error": pytest.approx(1 - balanced_accuracy_score(REFERENCES, PREDICTIONS)),
        "balanced_error:support": 8.0,
    }
    assert 0 < scores["balanced_error:balanced_error"] < 1
    # the script file itself is a spec too; two modules score into one mapping, apart from sklearn's `accuracy`
    both = load_user_metrics([str(modules["balanced_error"] / "balanced_error.py"), str(modules["accuracy"])])
    combined = score_user_metrics(both, PREDICTIONS, REFERENCES)
    assert combined["accuracy:accuracy"] == pytest.approx(accuracy_score(REFERENCES, PREDICTIONS))
    assert "accuracy" not in combined and len(combined) == 3


def one_line_error(spec: str) -> str:
    with pytest.raises(PeftkitError) as raised:
        load_user_metric(spec)
    message = str(raised.value)
    assert "\n" not in message and repr(spec) in message
    return message


def test_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_line_error("no_such_metric_xyz")
    assert "not a local evaluate module folder and cannot be fetched offline (HF_HUB_OFFLINE=1)" in message


def test_local_path_without_a_script_never_reaches_the_hub(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "has no empty.py" in one_line_error(str(tmp_path / "empty"))
    assert "does not exist" in one_line_error("./no/such/metric")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "broken.py").write_text("def (:\n")
    message = one_line_error(str(tmp_path / "broken"))  # the user's script fails to import: still one line
    assert "loading" in message and "SyntaxError" in message


def test_missing_evaluate_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "evaluate", None)  # `import evaluate` now raises ImportError
    assert "pip install 'peftkit[metrics]'" in one_line_error("accuracy")


@pytest.mark.parametrize(
    "body, message",
    [
        ("return {'score': float('nan')}", "'score' is nan; scores must be finite numbers"),
        ("return {'label': 'good', 'values': [1, 2]}", "compute returned no numeric score (keys: label, values)"),
        ("raise ValueError('Target is multiclass\\nmore detail')", "compute failed: ValueError: Target is multiclass"),
    ],
)
def test_bad_results_are_one_line_errors(body, message, tmp_path):
    metric = load_user_metric(str(write_module(tmp_path, "bad_metric", body)))
    with pytest.raises(PeftkitError, match="metric 'bad_metric': ") as raised:
        score_user_metric(metric, PREDICTIONS, REFERENCES)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_two_modules_with_one_name_are_refused(modules, tmp_path):
    other = write_module(tmp_path, "accuracy", "return {'accuracy': 0.5}")
    with pytest.raises(PeftkitError, match="both named 'accuracy'"):
        load_user_metrics([str(modules["accuracy"]), str(other)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, toy_task_dir) -> Path:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PEFTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield TinyRuns(tmp_path_factory.mktemp("eval"), tiny_model_dir("bert"), toy_task_dir).run("lora")


def test_eval_cli_prints_user_metrics_next_to_sklearn(run_dir, modules, capsys):
    from sklearn.metrics import balanced_accuracy_score

    from peftkit.artifacts import load
    from peftkit.data import encode, load_task
    from peftkit.inference import predict_logits
    from peftkit.recipe_files import load_config

    argv = ["eval", str(run_dir), "--device", "cpu", "--metric", str(modules["balanced_error"])]
    assert main([*argv, "--metric", str(modules["accuracy"])]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"accuracy", "f1", "macro_f1", "loss"} <= set(result) and result["examples"] == 32
    assert result["accuracy:accuracy"] == pytest.approx(result["accuracy"])  # same predictions, two implementations
    loaded = load(run_dir / "adapter")
    config = load_config(config_file=str(run_dir / "config.yaml"))
    rows = load_task(config.task, seed=config.train.seed).split("validation")
    predictions = predict_logits(
        loaded.model, encode(rows, loaded.tokenizer, 32), 64, loaded.model.device, None
    ).argmax(-1)
    expected = 1 - balanced_accuracy_score([r["label"] for r in rows], predictions.tolist())
    assert result["balanced_error:balanced_error"] == pytest.approx(expected)


def test_eval_cli_bad_metric_fails_in_one_line(run_dir, capsys):
    assert main(["eval", str(run_dir), "--metric", "./typo_metric"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metric './typo_metric': not a local evaluate module folder" in err


class InProcessExecutor:
    """Cells measured in this process (no spawn): the driver, the cell and the report all run as in a real bench."""

    def run(self, jobs):
        from peftkit.bench.executors import execute

        for job in jobs:
            assert job.user_metrics and Path(job.user_metrics[0]).is_absolute()  # resolved once, in the driver
            yield job, execute(job)


def test_bench_cells_record_and_report_user_metrics(modules, tiny_model_dir, toy_task_dir, tmp_path, capsys):
    from peftkit.bench import run_bench

    out = tmp_path / "bench"
    failing = write_module(tmp_path, "failing", "raise ValueError('boom')")
    specs = [str(modules["accuracy"]), str(failing), str(modules["balanced_error"])]
    bench = ("smoke", [str(toy_task_dir)], ["lora"], [0], out, str(tiny_model_dir("bert")))
    counts = run_bench(*bench, progress=False, executor=InProcessExecutor(), user_metrics=specs)
    assert counts["failed"] == 0
    path = out / "cells" / "toy__lora__seed0.json"
    cell = json.loads(path.read_text())
    scored = cell["user_metrics"]
    assert set(scored) == {"validation", "test", "error"}  # a failing module costs only its own scores
    assert scored["error"] == "metric 'failing': compute failed: ValueError: boom"
    for split in ("validation", "test"):  # the kept model's predictions: the built-in accuracy, computed again
        assert scored[split]["accuracy:accuracy"] == pytest.approx(cell[split]["accuracy"])
        assert 0 <= scored[split]["balanced_error:balanced_error"] <= 1
    with (out / "results.csv").open() as f:
        row = next(csv.DictReader(f))
    assert float(row["validation_accuracy:accuracy_mean"]) == pytest.approx(cell["validation"]["accuracy"])
    assert row["test_balanced_error:balanced_error_mean"] != ""
    markdown = (out / "results.md").read_text()
    assert "## User metrics" in markdown and "| val accuracy:accuracy |" in markdown

    # a done cell is not scored now (its weights are gone), whether it ran without --metric or with other modules
    capsys.readouterr()
    run_bench(*bench, progress=False, executor=InProcessExecutor(), user_metrics=specs[:1])
    assert "--metric scores only" not in capsys.readouterr().out  # scored by accuracy already
    other = write_module(tmp_path, "other", ACCURACY)
    counts = run_bench(*bench, progress=False, executor=InProcessExecutor(), user_metrics=[*specs[:1], str(other)])
    assert counts["skipped"] == 1 and counts["ran"] == 0
    note = "--metric scores only the cells run now; 1 cells already done have no {} scores"
    assert note.format("other") in capsys.readouterr().out
    del cell["user_metrics"]
    path.write_text(json.dumps(cell))
    run_bench(*bench, progress=False, executor=InProcessExecutor(), user_metrics=specs[:1])
    assert note.format("accuracy") in capsys.readouterr().out


def test_bench_rejects_a_bad_metric_before_training(toy_task_dir, tmp_path, capsys):
    argv = ["bench", "--profile", "smoke", "--tasks", str(toy_task_dir), "--methods", "lora"]
    assert main([*argv, "--metric", "./typo_metric", "--out", str(tmp_path / "out")]) == 2
    assert "metric './typo_metric'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_means_stds_and_cell_errors():
    cells = [
        {"user_metrics": {"validation": {"m:score": 0.5}, "test": {"m:score": 0.25}}},
        {"user_metrics": {"validation": {"m:score": 0.75}}},
        {"user_metrics": {"error": "metric 'm': compute failed: ValueError: boom"}},
        {"status": "ok"},  # a cell from before --metric: no scores, no error
    ]
    columns = user_metric_means(cells)
    assert columns["validation_m:score_mean"] == pytest.approx(0.625) and columns["test_m:score_std"] is None
    assert columns["validation_m:score_std"] == pytest.approx(0.1767767, rel=1e-5)
    assert columns["user_metric_errors"] == ["metric 'm': compute failed: ValueError: boom"]
    row = {"task": "toy", "method": "lora", "ok": 4, "cells": 4, **columns}
    section = "\n".join(user_metrics_section([row]))
    assert "| toy | lora | 4/4 | 0.625 ± 0.18 | 0.25 |" in section and "compute failed" in section
    assert user_metrics_section([{"task": "toy", "method": "lora", "ok": 1, "cells": 1}]) == []


def test_eval_reproduces_the_runs_own_precision_unless_told(run_dir, monkeypatch, capsys):
    import peftkit.precision as precision

    summary = json.loads((run_dir / "summary.json").read_text())
    kept = summary["validation"] or summary["best"]  # the kept weights on validation (selected on it here)
    recorded = summary["bf16"]  # train.bf16 null, resolved on this machine when the run trained
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: not recorded)  # here "where it pays" says the opposite
    argv = ["eval", str(run_dir), "--device", "cpu"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bf16"] is recorded and result["loss"] == pytest.approx(kept["loss"], abs=1e-7)
    assert main([*argv, "--no-bf16" if recorded else "--bf16"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["bf16"] is not recorded and other["loss"] != pytest.approx(result["loss"], abs=1e-7)
