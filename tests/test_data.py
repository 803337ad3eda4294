"""Tasks from folders, user JSONL/CSV/TSV files and string labels; dynamic padding; metrics."""

from __future__ import annotations

import json

import pytest

from peftkit.config import TaskConfig
from peftkit.data import collate, compute_metrics, encode, load_task
from peftkit.errors import PeftkitError
from peftkit.modeling import resolve_model_path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("default"))


def test_real_task_folders_read_with_label_names(shared_data):
    for name, labels, pair in (
        ("sst2", 2, False),
        ("banking77", 77, False),
        ("financial_phrasebank", 3, False),
        ("rte", 2, True),
        ("mrpc", 2, True),
    ):
        task = load_task(TaskConfig(name=name, data_dir=str(shared_data), max_train_examples=50))
        assert task.num_labels == labels and task.is_pair == pair
        assert len(task.splits["train"]) == 50 and task.splits["validation"]
    assert load_task(TaskConfig(name="mrpc", data_dir=str(shared_data))).metrics == ("accuracy", "f1")


def test_data_dir_from_environment(shared_data, monkeypatch):
    monkeypatch.setenv("PEFTKIT_DATA", str(shared_data))
    assert load_task(TaskConfig(name="rte")).splits["validation"]


def test_missing_task_in_data_dir_and_unknown_task(tmp_path):
    with pytest.raises(PeftkitError, match="not in the data folder"):
        load_task(TaskConfig(name="sst2", data_dir=str(tmp_path)))
    with pytest.raises(PeftkitError, match="Did you mean 'sst2'"):
        load_task(TaskConfig(name="sst3", data_dir=str(tmp_path)))


def test_unknown_task_names_the_task_folders_of_the_data_folder(tmp_path):
    """A typo of a user's own task folder under --data-dir was answered with the built-in names alone, which are not
    even there: the folder's own tasks are valid choices too."""
    (tmp_path / "news5").mkdir()
    (tmp_path / "news5" / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    with pytest.raises(PeftkitError, match=r"Did you mean 'news5'\?.*Valid: .*news5"):
        load_task(TaskConfig(name="news55", data_dir=str(tmp_path)))


def test_user_csv_with_string_labels_and_custom_columns(tmp_path):
    path = tmp_path / "tickets.csv"
    path.write_text("body,topic\n" + "".join(f"message {i},{['billing', 'login'][i % 2]}\n" for i in range(40)))
    task = load_task(TaskConfig(name=str(path), text_field="body", label_field="topic"))
    assert task.label_names == ["billing", "login"]
    assert len(task.splits["validation"]) == 4 and len(task.splits["train"]) == 36
    assert {r["label"] for r in task.splits["train"]} == {0, 1}


def test_user_jsonl_pairs_and_bad_label(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"q": f"a{i}", "d": f"b{i}", "y": i % 3}) + "\n" for i in range(30)))
    task = load_task(TaskConfig(name=str(path), text_field="q", text_pair_field="d", label_field="y"))
    assert task.is_pair and task.num_labels == 3
    with pytest.raises(PeftkitError, match="label 2 is outside 0..1"):
        load_task(TaskConfig(name=str(path), text_field="q", label_field="y", label_names=["x", "z"]))
    with pytest.raises(PeftkitError, match="text field .* 'txt'"):
        load_task(TaskConfig(name=str(path), text_field="txt", label_field="y"))


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_task_files_text_pair_column_makes_it_a_pair_task(tmp_path, suffix):
    """A task folder read text_pair from its rows, a task file dropped it silently: rte's train.jsonl trained as
    single texts."""
    rows = [{"text": f"a{i}", "text_pair": f"b{i}", "label": i % 2} for i in range(20)]
    path = tmp_path / f"pairs.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = "".join(f"{r['text']},{r['text_pair']},{r['label']}\n" for r in rows)
        path.write_text("text,text_pair,label\n" + lines)
    task = load_task(TaskConfig(name=str(path)))
    assert task.is_pair and all(row["text_pair"].startswith("b") for row in task.splits["train"])


def test_numbers_as_label_names_are_names_never_positions(tmp_path):
    """Ratings 1..3 in train make the names "1".."3": a 0 in validation is an unknown label, not position 0."""
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    train.write_text("".join(json.dumps({"text": f"review {i}", "label": 1 + i % 3}) + "\n" for i in range(30)))
    validation.write_text(json.dumps({"text": "a", "label": 3}) + "\n" + json.dumps({"text": "b", "label": 1}) + "\n")
    task = load_task(TaskConfig(name=str(train), validation_file=str(validation)))
    assert task.label_names == ["1", "2", "3"] and [r["label"] for r in task.splits["validation"]] == [2, 0]
    validation.write_text(json.dumps({"text": "zero", "label": 0}) + "\n")
    with pytest.raises(PeftkitError, match="'0'.*1, 2, 3"):
        load_task(TaskConfig(name=str(train), validation_file=str(validation)))


def test_an_integer_label_is_a_position_only_in_label_names_that_were_given(tmp_path):
    """Names read from train ("neg", "pos") are the classes: a validation 1 is an unseen class, not "pos"."""
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    write_jsonl(train, [{"text": f"t {i}", "label": "neg pos".split()[i % 2]} for i in range(10)])
    write_jsonl(validation, [{"text": "a", "label": "neg"}, {"text": "b", "label": 1}])
    with pytest.raises(PeftkitError, match="unknown label in .*validation.jsonl:2 '1'"):
        load_task(TaskConfig(name=str(train), validation_file=str(validation)))
    given = load_task(TaskConfig(name=str(train), validation_file=str(validation), label_names=["neg", "pos"]))
    assert [r["label"] for r in given.splits["validation"]] == [0, 1]


def test_a_csv_header_differing_in_case_or_spaces_is_named_as_the_likely_column(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text("Text , LABEL\n" + "".join(f"t {i},{'ab'[i % 2]}\n" for i in range(10)))
    with pytest.raises(PeftkitError, match=r"'text' is missing; fields: .*Did you mean 'Text '\?"):
        load_task(TaskConfig(name=str(path)))
    with pytest.raises(PeftkitError, match=r"no 'label' value .*Did you mean ' LABEL'\?"):
        load_task(TaskConfig(name=str(path), text_field="Text "))


def test_a_byte_order_mark_is_read_past_and_a_folder_needs_train(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("text,label\n" + "".join(f"t {i},{'ab'[i % 2]}\n" for i in range(20)), encoding="utf-8-sig")
    assert load_task(TaskConfig(name=str(path))).label_names == ["a", "b"]
    folder = tmp_path / "only-validation"
    folder.mkdir()
    (folder / "validation.jsonl").write_text(json.dumps({"text": "a", "label": 0}) + "\n")
    with pytest.raises(PeftkitError, match=r"has no train.jsonl \(a task folder needs both\)$"):  # no CSV advice
        load_task(TaskConfig(name=str(folder)))


def test_a_tsv_file_is_a_tab_table_and_another_suffix_is_named(tmp_path):
    path = tmp_path / "glue.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"a, b; c {i}\t{'ab'[i % 2]}\n" for i in range(20)))
    task = load_task(TaskConfig(name=str(path), text_field="sentence"))
    assert task.label_names == ["a", "b"] and task.splits["train"][0]["text"].startswith("a, b; c")
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(PeftkitError, match=r"rows.json has suffix .json; a task file is one of: .jsonl, .csv, .tsv"):
        load_task(TaskConfig(name=str(tmp_path / "rows.json")))


def test_split_files_replace_a_folder_tasks_own_and_a_folder_of_csv_files_is_named(tmp_path, monkeypatch):
    """task.test_file on a task folder was dropped without a word (no test split scored); a folder of train.csv /
    validation.csv was an 'unknown task'."""
    folder = tmp_path / "tickets"
    folder.mkdir()
    rows = "".join(json.dumps({"text": f"t {i}", "label": "ab"[i % 2]}) + "\n" for i in range(10))
    for name in ("train.jsonl", "validation.jsonl", "mine.jsonl"):
        (folder / name).write_text(rows)
    task = load_task(TaskConfig(name=str(folder), test_file=str(folder / "mine.jsonl")))
    assert len(task.splits["test"]) == 10
    with pytest.raises(PeftkitError, match="not of the Hub's 'sst2'"):
        monkeypatch.delenv("PEFTKIT_DATA", raising=False)
        load_task(TaskConfig(name="sst2", test_file=str(folder / "mine.jsonl")))
    for name in ("train", "validation"):
        (folder / f"{name}.jsonl").rename(folder / f"{name}.csv")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PeftkitError, match="tickets has no train.jsonl .*holds mine.jsonl, train.csv, validation.csv"):
        load_task(TaskConfig(name="tickets"))


def test_broken_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{oops\n')
    with pytest.raises(PeftkitError, match="bad.jsonl:2 is not valid JSON"):
        load_task(TaskConfig(name=str(path)))


def test_dynamic_padding_pads_to_the_longest_row_in_the_batch(tokenizer):
    rows = [{"text": "short", "label": 0}, {"text": "a much longer sentence than the other one", "label": 1}]
    split = encode(rows, tokenizer, max_length=64)
    batch = collate(split, [0, 1])
    longest = len(split.features["input_ids"][1])
    assert batch["input_ids"].shape == (2, longest)
    assert batch["attention_mask"][0].sum() == len(split.features["input_ids"][0])
    assert batch["labels"].tolist() == [0, 1]
    assert collate(split, [0])["input_ids"].shape[1] == len(split.features["input_ids"][0])


def test_metrics():
    m = compute_metrics([0, 1, 1, 0], [0, 1, 0, 0], 2)
    assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx(2 / 3)
    assert "f1" not in compute_metrics([0, 1, 2], [0, 1, 1], 3)


def test_numeric_labels_in_jsonl_are_names_like_in_csv(tmp_path):
    path = tmp_path / "stars.jsonl"
    path.write_text("".join(json.dumps({"text": f"review {i}", "label": 1 + i % 5}) + "\n" for i in range(50)))
    task = load_task(TaskConfig(name=str(path)))
    assert task.label_names == ["1", "2", "3", "4", "5"]
    assert {r["label"] for r in task.splits["train"]} == {0, 1, 2, 3, 4}


def test_macro_f1_ignores_classes_absent_from_both_sides():
    assert compute_metrics([0, 1, 2], [0, 1, 2], 77)["macro_f1"] == 1.0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_skipped_rows_label_never_becomes_a_class(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(20)] + [{"text": None, "label": "phantom"}]
    task = load_task(TaskConfig(name=str(write_jsonl(tmp_path / "rows.jsonl", rows)), on_bad_row="skip"))
    assert task.label_names == ["a", "b"] and task.skipped_rows == [f"{tmp_path / 'rows.jsonl'}:21"]


def test_a_missing_label_field_or_an_empty_file_is_named(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"t{i}", "y": i % 2} for i in range(20)])
    with pytest.raises(PeftkitError, match=r"rows.jsonl:\d+: no 'label' value .*; fields: text, y"):
        load_task(TaskConfig(name=str(path)))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PeftkitError, match="the train split has no rows"):
        load_task(TaskConfig(name=str(tmp_path / "empty.jsonl")))
    with pytest.raises(PeftkitError, match="the validation split has no rows"):
        load_task(TaskConfig(name=str(path), label_field="y", validation_file=str(tmp_path / "empty.jsonl")))


def test_csv_cells_longer_than_the_csv_modules_cap_are_read_and_the_cap_is_left_alone(tmp_path):
    import csv

    path = tmp_path / "long.csv"
    path.write_text("text,label\n" + "".join(f"{'x' * (200_000 if i == 0 else 5)},{'ab'[i % 2]}\n" for i in range(20)))
    task = load_task(TaskConfig(name=str(path)))
    assert max(len(r["text"]) for split in task.splits.values() for r in split) == 200_000
    assert csv.field_size_limit() == 131_072


def test_an_empty_label_names_list_is_an_error_not_unset(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(20)])
    with pytest.raises(PeftkitError, match=r"task.label_names must name at least 2 classes, got \[\]"):
        load_task(TaskConfig(name=str(path), label_names=[]))


def test_a_single_class_left_by_subsampling_is_refused_naming_the_setting(tmp_path):
    """Sorted by label, 50 'a' then 10 'b': a seeded sample of 3 rows (or the train left beside a big dev split)
    can hold only 'a'; training on it would 'succeed' and learn nothing."""
    rows = [{"text": f"t{i}", "label": "a" if i < 50 else "b"} for i in range(60)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(PeftkitError, match=r"1 class \(a\) in its seeded sample of task.max_train_examples=3"):
        load_task(TaskConfig(name=str(path), max_train_examples=3))
    with pytest.raises(PeftkitError, match=r"1 class \(a\) after task.dev_size=0.99"):
        load_task(TaskConfig(name=str(path), dev_size=0.99))


def test_evaluation_samples_are_the_same_rows_for_every_train_seed(toy_task_dir):
    """max_eval_examples draws by task.dev_seed: seeds that differ only in train.seed are scored on the same rows."""
    cfg = TaskConfig(name=str(toy_task_dir), dev_size=20, max_eval_examples=10)
    first, second = load_task(cfg, seed=0), load_task(cfg, seed=1)
    for split in ("validation", "test", "dev"):
        assert first.splits[split] == second.splits[split] and len(first.splits[split]) == 10, split
    other_rows = TaskConfig(name=str(toy_task_dir), dev_size=20, max_eval_examples=10, dev_seed=1)
    assert load_task(other_rows).splits["validation"] != first.splits["validation"]  # dev_seed is what draws them


def test_max_eval_examples_caps_dev_and_leaves_train_as_the_carve_left_it(toy_task_dir):
    whole = load_task(TaskConfig(name=str(toy_task_dir), dev_size=20))
    capped = load_task(TaskConfig(name=str(toy_task_dir), dev_size=20, max_eval_examples=8))
    assert len(capped.splits["dev"]) == 8 and all(r in whole.splits["dev"] for r in capped.splits["dev"])
    assert capped.splits["train"] == whole.splits["train"]  # the cap never moves rows into train


def test_a_file_tasks_held_out_rows_are_the_same_for_every_train_seed(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(50)])
    first, second = load_task(TaskConfig(name=str(path)), seed=0), load_task(TaskConfig(name=str(path)), seed=1)
    assert first.splits == second.splits and len(first.splits["validation"]) == 5
