"""`peftkit predict`: JSONL, CSV and stdin in, input fields plus predictions out, matching the adapter's own logits."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
import sys

import pytest
import torch
from tiny_runs import TEXTS, TinyRuns, logits_of, three_label_task

from peftkit.artifacts import load
from peftkit.cli import main
from peftkit.errors import PeftkitError


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir, toy_task_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("PEFTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield TinyRuns(tmp_path_factory.mktemp("pred"), tiny_model_dir("bert"), toy_task_dir).run("lora") / "adapter"
    mp.undo()


def read_preds(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check(preds, adapter):
    loaded = load(adapter)
    probs = torch.softmax(logits_of(loaded.model, loaded.tokenizer, TEXTS), -1)
    assert len(preds) == len(TEXTS)
    for row, p in zip(preds, probs):
        assert set(row) >= {"label", "label_name", "probabilities"}
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-4
        assert row["label"] == int(p.argmax()) and row["label_name"] == ["negative", "positive"][row["label"]]
        assert abs(row["probabilities"]["positive"] - float(p[1])) < 1e-5


def test_predict_jsonl_keeps_ids_in_small_batches(adapter, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)) + "\n")
    out = tmp_path / "out" / "preds.jsonl"
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(out), "--batch-size", "3"]) == 0
    preds = read_preds(out)
    check(preds, adapter)
    assert [p["id"] for p in preds] == ["r0", "r1", "r2", "r3"]
    assert not [f for f in out.parent.iterdir() if f.name != "preds.jsonl"]  # no temp files left behind


def test_predict_csv_and_bf16(adapter, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("text,other\n" + "".join(f'"{t}",x\n' for t in TEXTS))
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(out)]) == 0
    check(read_preds(out), adapter)
    assert "id" not in read_preds(out)[0]
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(tmp_path / "b.jsonl"), "--bf16"]) == 0
    assert [p["label"] for p in read_preds(tmp_path / "b.jsonl")] and len(read_preds(tmp_path / "b.jsonl")) == 4


def test_predict_reads_a_tsv_input_as_a_tab_table(adapter, tmp_path):
    src = tmp_path / "in.tsv"
    src.write_text("text\tid\n" + "".join(f"{t}\tr{i}\n" for i, t in enumerate(TEXTS)))
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(tmp_path / "p.jsonl")]) == 0
    check(read_preds(tmp_path / "p.jsonl"), adapter)
    assert [p["id"] for p in read_preds(tmp_path / "p.jsonl")] == ["r0", "r1", "r2", "r3"]
    # and written as one: a tab table with the input's columns, then the prediction's
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(tmp_path / "p.tsv")]) == 0
    lines = (tmp_path / "p.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:4] == ["text", "id", "label", "label_name"] and len(lines) == 5


def test_predict_stdin_to_stdout(adapter, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(json.dumps({"text": t}) + "\n" for t in TEXTS)))
    assert main(["predict", str(adapter), "--input", "-", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    check([json.loads(line) for line in out.splitlines()], adapter)


def test_predict_streams_instead_of_reading_everything(adapter, monkeypatch, tmp_path):
    import peftkit.predict as predict

    seen = []
    monkeypatch.setattr(predict, "CHUNK_BATCHES", 1)
    real = predict.predict_rows
    monkeypatch.setattr(
        predict, "predict_rows", lambda loaded, rows, *a, **k: seen.append(len(rows)) or real(loaded, rows, *a, **k)
    )
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"text": TEXTS[i % 4]}) + "\n" for i in range(25)))
    out = str(tmp_path / "o.jsonl")
    assert main(["predict", str(adapter), "--input", str(src), "--output", out, "--batch-size", "8"]) == 0
    assert seen == [8, 8, 8, 1] and len(read_preds(tmp_path / "o.jsonl")) == 25


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"text": "ok"}\n{oops\n', "in.jsonl:2 is not valid JSON"),
        ('{"sentence": "x"}\n', "in.jsonl:1: the text field (task.text_field) 'text' is missing; fields: sentence"),
        ('{"text": "ok"}\n{"text": null, "id": 2}\n', "in.jsonl:2: 'text' is null"),  # null, not 'no such field'
    ],
)
def test_predict_bad_input_is_one_clear_error(adapter, tmp_path, capsys, content, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    out = tmp_path / "o.jsonl"
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # atomic: no half-written output
    assert main(["predict", str(adapter), "--input", str(tmp_path / "missing.jsonl")]) == 2


def test_predict_folds_a_mergeable_adapter_in_and_no_merge_keeps_it(adapter, tmp_path, monkeypatch):
    loaded = load(adapter)
    merged = loaded.merged()
    assert not any("lora" in name for name, _ in merged.model.named_modules())
    assert torch.allclose(
        logits_of(merged.model, merged.tokenizer, TEXTS),
        logits_of(load(adapter).model, loaded.tokenizer, TEXTS),
        atol=1e-5,
    )
    folded = []
    import peftkit.artifacts as artifacts

    original = artifacts.LoadedAdapter.merged
    monkeypatch.setattr(artifacts.LoadedAdapter, "merged", lambda self: folded.append(1) or original(self))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(tmp_path / "a.jsonl")]) == 0
    assert (
        main(["predict", str(adapter), "--input", str(src), "--output", str(tmp_path / "b.jsonl"), "--no-merge"]) == 0
    )
    assert folded == [1]
    check(read_preds(tmp_path / "a.jsonl"), adapter)
    check(read_preds(tmp_path / "b.jsonl"), adapter)


def test_eval_refuses_a_task_whose_labels_are_not_the_adapters(adapter, tmp_path, toy_task_dir, capsys):
    """The run's task read again with other label names (data edited, another --data-dir) would score label i
    against a head trained for another class: one line naming both lists, never numbers."""
    run = tmp_path / "run"
    shutil.copytree(adapter.parent, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(toy_task_dir), str(three_label_task(tmp_path, toy_task_dir))))
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "labels ['negative', 'positive', 'neutral'] but the adapter was trained on ['negative', 'positive']" in err


def test_predict_keeps_every_input_field_and_writes_csv_for_a_csv_output(adapter, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"ID": i, "uid": f"u{i}", "text": t, "label": "gold"}) + "\n" for i, t in enumerate(TEXTS))
    )
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(tmp_path / "p.jsonl")]) == 0
    preds = read_preds(tmp_path / "p.jsonl")
    check(preds, adapter)
    assert list(preds[0])[:4] == ["ID", "uid", "text", "input_label"] and preds[0]["input_label"] == "gold"
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == [
        "ID",
        "uid",
        "text",
        "input_label",
        "label",
        "label_name",
        "probabilities.negative",
        "probabilities.positive",
    ]
    assert [r["label_name"] for r in rows] == [p["label_name"] for p in preds] and rows[3]["ID"] == "3"
    assert abs(float(rows[0]["probabilities.positive"]) - preds[0]["probabilities"]["positive"]) < 1e-9


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("in.jsonl", "", "nothing to predict in"),
        ("in.csv", "text\n", "nothing to predict in"),
        (
            "in.jsonl",
            '{"text": "a"}\n{"text": "b", "text_pair": "c"}\n',
            "in.jsonl:2 has a text_pair but the adapter classifies single texts",
        ),
    ],
)
def test_predict_refuses_what_it_would_predict_silently_wrong(adapter, tmp_path, capsys, name, content, message):
    src = tmp_path / name
    src.write_text(content)
    out = tmp_path / "o.jsonl"
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_predict_refuses_an_output_suffix_it_does_not_write(adapter, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "ok"}) + "\n")
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(tmp_path / "p.txt")]) == 2
    assert "predictions are written as .jsonl, .csv, .tsv (by the file's suffix), got .txt" in capsys.readouterr().err


def test_python_predict_equals_the_cli_rows_in_input_order(adapter, tmp_path):
    texts = [*TEXTS, TEXTS[0]]  # lengths differ: predict_logits batches longest first, then restores the order
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["predict", str(adapter), "--input", str(src), "--output", str(tmp_path / "p.jsonl")]) == 0
    cli = read_preds(tmp_path / "p.jsonl")
    got = load(adapter).merged().predict(texts, batch_size=2)  # the CLI folds a mergeable adapter in by default
    assert [p["label_name"] for p in got] == [p["label_name"] for p in cli] and got[0] == got[-1]
    for mine, theirs in zip(got, cli):
        assert set(mine) == {"label", "label_name", "probabilities"} and mine["label"] == theirs["label"]
        assert all(abs(mine["probabilities"][k] - v) <= 1e-6 for k, v in theirs["probabilities"].items())
    check(load(adapter).predict(TEXTS, bf16=False), adapter)
    assert load(adapter).predict([]) == []


def test_python_predict_refuses_bad_texts_in_one_line(adapter):
    loaded = load(adapter)
    pair_task = dataclasses.replace(loaded.meta.task, is_pair=True)
    pair = dataclasses.replace(loaded, meta=dataclasses.replace(loaded.meta, task=pair_task))
    for call, message in [
        (lambda: loaded.predict(["ok", None]), "text 1: 'text' is null"),
        (lambda: loaded.predict(["ok", 3]), "text 1: 'text' must be a string, got int 3"),
        (lambda: loaded.predict("ok"), "texts must be a list of strings (one text: [text]), got str"),
        (lambda: loaded.predict(["a"], text_pairs=["b"]), "classifies single texts: drop text_pairs"),
        (lambda: pair.predict(["a", "b"], text_pairs=["c"]), "text_pairs has 1 entries and texts 2"),
        (lambda: pair.predict(["a"]), "classifies sentence pairs: pass text_pairs"),
        (lambda: pair.predict(["a"], text_pairs=[None]), "text 0: 'text_pair' is null"),
        (lambda: loaded.predict(["a"], batch_size=0), "batch_size must be an integer of at least 1, got 0"),
    ]:
        with pytest.raises(PeftkitError, match=re.escape(message)) as e:
            call()
        assert "\n" not in str(e.value)
