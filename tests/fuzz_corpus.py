"""A generated corpus of hostile-but-fair inputs for the `peftkit` command (issue 11), and its runner.

Each case is an argv for `peftkit.cli.main`, built inside a fresh folder from a small environment (a tiny random
BERT with the MiniLM tokenizer, a toy 2-class task, a base recipe, and lazily a trained adapter and a run with
checkpoints). The rule every case must keep: exit 0, or exit 2 with exactly one line on stderr starting
`peftkit: error:`, and never a traceback. Cases marked "error" must be refused, cases marked "ok" must succeed.

    python tests/fuzz_corpus.py            # run the whole corpus against whichever peftkit is importable
    python tests/fuzz_corpus.py --fast     # the CI slice
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OK, ERROR, ANY = "ok", "error", "any"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # as `peftkit` sets it before transformers is imported


@dataclass
class Case:
    id: str
    kind: str  # override, config, data, predict, eval, adapter, resume
    build: Callable[[FuzzEnv, Path], list[str]]  # (env, case folder) -> argv
    expect: str = ANY
    fast: bool = False


@dataclass
class Outcome:
    case: Case
    rc: object
    stderr: str
    passed: bool
    why: str
    seconds: float


# --------------------------------------------------------------------------------------------- environment


def _rows(n: int, seed: int = 0, classes=(0, 1)) -> list[dict]:
    rng = random.Random(seed)
    words = {
        0: ["awful", "terrible", "bad", "boring"],
        1: ["great", "wonderful", "excellent", "good"],
        2: ["okay", "fine", "average", "plain"],
    }
    out = []
    for _ in range(n):
        label = rng.choice(classes)
        out.append({"text": f"the film was {rng.choice(words[label % 3])}", "label": label})
    return out


def _jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


class FuzzEnv:
    """Shared fixtures of the corpus, created on first use under `root`."""

    def __init__(self, root: Path, model_dir: Path | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._model, self._adapter, self._ckpt_run = model_dir, None, None
        self.task = self.root / "toy"
        self.task.mkdir(exist_ok=True)
        for split, n in (("train", 48), ("validation", 16), ("test", 16)):
            (self.task / f"{split}.jsonl").write_text(_jsonl(_rows(n, seed=len(split))))
        (self.task / "meta.json").write_text(json.dumps({"label_names": ["negative", "positive"]}))
        os.environ.setdefault("PEFTKIT_CACHE", str(self.root / "cache"))

    @property
    def model(self) -> Path:
        if self._model is None:
            import torch
            from transformers import AutoModel, AutoTokenizer, BertConfig

            from peftkit.modeling import resolve_model_path

            path = self.root / "tiny-bert"
            torch.manual_seed(0)
            config = BertConfig(
                vocab_size=30522,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=128,
            )
            AutoModel.from_config(config).save_pretrained(path)
            AutoTokenizer.from_pretrained(
                resolve_model_path("default"), model_input_names=["input_ids", "token_type_ids", "attention_mask"]
            ).save_pretrained(path)
            self._model = path
        return self._model

    def config(self, folder: Path, **train) -> Path:
        """A recipe YAML for the tiny model and the toy task, two steps long."""
        import yaml

        data = {
            "recipe": "fuzz",
            "task": {"name": str(self.task), "max_length": 32},
            "model": {"name_or_path": str(self.model)},
            "method": {"name": "lora"},
            "train": {
                "max_steps": 2,
                "batch_size": 8,
                "lr": 0.01,
                "progress": False,
                "log_every": 1,
                "eval_batch_size": 16,
                "output_dir": str(folder / "runs"),
                **train,
            },
        }
        path = folder / "base.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def train_argv(self, folder: Path, *overrides: str, **train) -> list[str]:
        return ["train", "--config", str(self.config(folder, **train)), "--run-dir", str(folder / "run"), *overrides]

    def _train_once(self, name: str, **train) -> Path:
        from peftkit.cli import main

        folder = self.root / name
        folder.mkdir(exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(self.train_argv(folder, **train))
        assert rc == 0, f"setting up the fuzz environment failed ({name})"
        return folder / "run"

    @property
    def adapter(self) -> Path:
        if self._adapter is None:
            self._adapter = self._train_once("adapter-run") / "adapter"
        return self._adapter

    def checkpointed_run(self, folder: Path) -> Path:
        """A copy (in `folder`) of a run of 6 steps with checkpoints at steps 2 and 4."""
        if self._ckpt_run is None:
            run = self._train_once("ckpt-run", max_steps=6, checkpoint_every=2)
            shutil.rmtree(run / "adapter")  # as if killed after step 5
            (run / "summary.json").unlink()
            self._ckpt_run = run
        copy = folder / "run"
        shutil.copytree(self._ckpt_run, copy)
        return copy


# --------------------------------------------------------------------------------------------- the corpus


NUMERIC_FIELDS = [
    "train.seed",
    "train.epochs",
    "train.max_steps",
    "train.batch_size",
    "train.grad_accum_steps",
    "train.lr",
    "train.head_lr",
    "train.weight_decay",
    "train.warmup_ratio",
    "train.max_grad_norm",
    "train.eval_every",
    "train.eval_batch_size",
    "train.log_every",
    "train.checkpoint_every",
    "task.max_length",
    "task.max_train_examples",
    "task.max_eval_examples",
    "method.r",
    "method.alpha",
    "method.dropout",
]
BAD_VALUES = {
    ".nan": ERROR,
    ".inf": ERROR,
    "-.inf": ERROR,
    "-5": ERROR,
    "0": ANY,
    "99999999999999999999": ANY,
    "abc": ERROR,
    "[1, 2]": ERROR,
    "{a: 1}": ERROR,
    "true": ERROR,
}


def _override_cases() -> list[Case]:
    cases = []
    for i, field in enumerate(NUMERIC_FIELDS):
        for j, (value, expect) in enumerate(BAD_VALUES.items()):

            def build(env, folder, field=field, value=value):
                return ["train", "--config", str(env.config(folder)), "--dry-run", f"{field}={value}"]

            cases.append(Case(f"dry:{field}={value}", "override", build, expect, fast=i % 2 == 0 and j == i % 10))
    choice_values = [
        ("method.bias=weird", ERROR),
        ("train.metric_for_best=bogus", ERROR),
        ("task.on_bad_row=maybe", ERROR),
        ("model.quantization=3bit", ERROR),
        ("train.run_name=../../x", ERROR),
        ("train.run_name=/tmp/abs", ERROR),
        ("train.run_name=..", ERROR),
        ("train.run_name=ok-name", OK),
        ("task.encoding=nosuchcodec", ERROR),
        ("task.delimiter=;;", ERROR),
        ("method.name=nosuch", ERROR),
        ("method.target_modules=[1, [2]]", ERROR),
        ("nosection.x=1", ERROR),
        ("train.lrr=1", ERROR),
        ("lr=1", ERROR),
        ("train.=1", ERROR),
        ("train.bf16=maybe", ERROR),
        ("task.allow_empty_text=yes", OK),
        ("train.lr=5e-4", OK),
        ("train.seed=4294967296", ERROR),
    ]
    for k, (item, expect) in enumerate(choice_values):

        def build(env, folder, item=item):
            return ["train", "--config", str(env.config(folder)), "--dry-run", item]

        cases.append(Case(f"dry:{item}", "override", build, expect, fast=k % 4 == 0))
    trains = [  # issue 11, lists 5 and 6: each run for real (two steps) where the config passes
        ("train.epochs=.nan", ERROR),
        ("train.warmup_ratio=.nan", ERROR),
        ("train.seed=99999999999999999999", ERROR),
        ("train.output_dir=/etc/passwd", ERROR),
        ("task.max_length=-5", ERROR),
        ("task.max_length=100000", ERROR),
        ("task.max_length=0", ERROR),
        ("task.max_train_examples=-5", ERROR),
        ("task.max_train_examples=0", ERROR),
        ("task.max_eval_examples=-1", ERROR),
        ("method.r=0", ERROR),
        ("method.dropout=2.0", ERROR),
        ("method.target_modules=[nosuchmodule]", ERROR),
        ("method.bias=weird", ERROR),
        ("train.lr=-1", ERROR),
        ("train.warmup_ratio=-0.1", ERROR),
        ("train.weight_decay=-1", ERROR),
        ("train.max_grad_norm=-1", ERROR),
        ("train.lr=.nan", ERROR),
        ("train.lr=.inf", ERROR),
        ("train.run_name=../../x", ERROR),
        ("method.target_modules=[query]", OK),
        ("train.lr=10", ANY),
        ("task.max_length=128", OK),
        ("", OK),
    ]
    for k, (item, expect) in enumerate(trains):

        def build(env, folder, item=item):
            argv = env.train_argv(folder)
            if item.startswith("train.run_name") or item.startswith("train.output_dir"):
                argv = argv[:3]  # no --run-dir: the run folder comes from output_dir/run_name
            return argv + ([item] if item else [])

        cases.append(Case(f"train:{item or 'baseline'}", "override", build, expect, fast=k % 5 == 0))

    def run_dir_is_file(env, folder):
        (folder / "afile").write_text("x")
        return ["train", "--config", str(env.config(folder)), "--run-dir", str(folder / "afile" / "run")]

    def output_dir_is_file(env, folder):
        (folder / "afile").write_text("x")
        return ["train", "--config", str(env.config(folder)), f"train.output_dir={folder / 'afile'}"]

    cases += [
        Case("train:--run-dir under a file", "override", run_dir_is_file, ERROR),
        Case("train:output_dir is a file", "override", output_dir_is_file, ERROR, fast=True),
        Case("cli:no args", "override", lambda env, folder: ["train"], ERROR),
        Case("cli:unknown flag", "override", lambda env, folder: ["train", "sst2-lora", "--nosuch"], ERROR, True),
        Case("cli:unknown verb", "override", lambda env, folder: ["nosuchverb"], ERROR),
        Case("cli:recipe is a YAML list", "override", lambda env, folder: ["train", "[1, 2]", "--dry-run"], ERROR),
        Case(
            "cli:recipe and --config",
            "override",
            lambda env, folder: ["train", "sst2-lora", "--config", str(env.config(folder))],
            ERROR,
        ),
    ]
    return cases


def _config_cases() -> list[Case]:
    def file_case(name: str, content: bytes | str, expect: str = ERROR, fast: bool = False) -> Case:
        def build(env, folder):
            path = folder / "mine.yaml"
            if isinstance(content, str):
                path.write_text(content.replace("@MODEL@", str(env.model) if "@MODEL@" in content else ""))
            else:
                path.write_bytes(content)
            return ["train", "--config", str(path), "--dry-run"]

        return Case(f"config:{name}", "config", build, expect, fast)

    good = "task: {name: sst2}\nmethod: {name: lora}\ntrain: {max_steps: 2}\n"
    cases = [
        file_case("not UTF-8", b"task: {name: caf\xe9}\nmethod: {name: lora}\n", fast=True),
        file_case("nested 5000 lists", "a: " + "[" * 5000 + "]" * 5000 + "\n"),
        file_case("nested 5000 mappings", "a: " + "{b: " * 5000 + "1" + "}" * 5000 + "\n", fast=True),
        file_case("method: lora scalar", "task: {name: sst2}\nmethod: lora\n", fast=True),
        file_case("recipe is a list", "recipe: [1, 2]\n" + good),
        file_case("recipe escapes", "recipe: ../../x\n" + good, fast=True),
        file_case("recipe absolute", "recipe: /tmp/x\n" + good),
        file_case("empty file", ""),
        file_case("python tag", "!!python/object/apply:os.system ['echo pwned']\n", fast=True),
        file_case("top-level list", "- task\n- method\n"),
        file_case("unknown section", "tasks: {name: sst2}\n" + good),
        file_case("include missing", "include: nosuch.yaml\n" + good),
        file_case("include cycle", "include: mine.yaml\n" + good),
        file_case("include a number", "include: 5\n" + good),
        file_case("task is a list", "task: [1, 2]\nmethod: {name: lora}\n"),
        file_case("method without name", "task: {name: sst2}\nmethod: {r: 4}\n"),
        file_case("tabs", "task:\n\tname: sst2\n"),
        file_case("binary garbage", bytes(random.Random(0).randrange(256) for _ in range(300))),
        file_case("huge int", "task: {name: sst2}\nmethod: {name: lora, r: 1" + "0" * 400 + "}\n"),
        file_case("null sections", "task:\nmodel:\nmethod: {name: lora}\ntrain:\n", OK),
        file_case("good", good, OK, fast=True),
    ]

    def directory(env, folder):
        (folder / "dir.yaml").mkdir()
        return ["train", "--config", str(folder / "dir.yaml"), "--dry-run"]

    cases += [
        Case("config:a directory", "config", directory, ERROR, True),
        Case("config:missing", "config", lambda env, folder: ["train", "--config", str(folder / "no.yaml")], ERROR),
    ]
    return cases


def _data_cases() -> list[Case]:
    cases = []

    def folder_task(
        name: str,
        expect: str,
        train=None,
        validation=None,
        test=None,
        meta=None,
        overrides=(),
        fast=False,
        raw: dict | None = None,
    ):
        def build(env, folder):
            task = folder / "task"
            task.mkdir()
            files = {
                "train.jsonl": train if train is not None else _rows(40),
                "validation.jsonl": validation if validation is not None else _rows(12, 1),
            }
            if test is not None:
                files["test.jsonl"] = test
            for file, rows in files.items():
                (task / file).write_text(_jsonl(rows)) if isinstance(rows, list) else (task / file).write_bytes(rows)
            (task / "meta.json").write_text(meta if meta is not None else json.dumps({"label_names": ["neg", "pos"]}))
            for file, content in (raw or {}).items():
                (task / file).write_bytes(content)
            return env.train_argv(folder, f"task.name={task}", *overrides)

        cases.append(Case(f"data:{name}", "data", build, expect, fast))

    def file_task(name: str, expect: str, content: bytes | str, suffix=".jsonl", overrides=(), fast=False):
        def build(env, folder):
            path = folder / f"rows{suffix}"
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
            return env.train_argv(folder, f"task.name={path}", *overrides)

        cases.append(Case(f"data:{name}", "data", build, expect, fast))

    good = _rows(40)

    def with_row(row, at=5):
        return good[:at] + [row] + good[at:]

    bad_rows = {
        "null text": {"text": None, "label": 0},
        "object text": {"text": {"a": 1}, "label": 0},
        "list text": {"text": ["a"], "label": 1},
        "number text": {"text": 123, "label": 1},
        "empty text": {"text": "", "label": 0},
        "blank text": {"text": "   \t", "label": 0},
        "lone surrogate": '{"text": "\\ud800 broken", "label": 0}',
        "NaN label": '{"text": "nan label", "label": NaN}',
        "list label": {"text": "list label", "label": [1]},
        "object label": {"text": "obj label", "label": {"a": 1}},
        "float label 1.5": {"text": "half label", "label": 1.5},
        "missing label": {"text": "no label"},
        "missing text field": {"body": "x", "label": 1},
        "not an object": "[1, 2, 3]",
        "invalid JSON": "{text: x",
        "100000 nested": "[" * 100000 + "]" * 100000,
        "unknown label name": {"text": "t", "label": "neutral"},
        "label out of range": {"text": "t", "label": 7},
    }
    for k, (name, row) in enumerate(bad_rows.items()):
        folder_task(f"train row: {name}", ERROR, train=with_row(row), fast=k % 6 == 0)
        folder_task(f"train row: {name} (skip)", OK, train=with_row(row), overrides=["task.on_bad_row=skip"])
    for name in ("null text", "lone surrogate", "unknown label name", "missing label"):
        folder_task(f"validation row: {name}", ERROR, validation=with_row(bad_rows[name], 3)[:12])
    folder_task(
        "empty text allowed", OK, train=with_row(bad_rows["empty text"]), overrides=["task.allow_empty_text=true"]
    )
    folder_task("float label 1.0", OK, train=with_row({"text": "whole", "label": 1.0}))
    folder_task("bool label", ANY, train=with_row({"text": "bool", "label": True}))
    folder_task(
        "labels missing after row 1", ERROR, train=good[:1] + [{"text": r["text"]} for r in good[1:]], fast=True
    )
    folder_task("one class in train", ERROR, train=[{**r, "label": 0} for r in good], fast=True)
    folder_task("partial test labels", ERROR, test=_rows(6, 2) + [{"text": "unlabelled"}])
    folder_task("unlabelled test", OK, test=[{"text": r["text"]} for r in _rows(6, 2)])
    folder_task("meta not JSON", ERROR, meta="{label_names: [", fast=True)
    folder_task("meta label_names a string", ERROR, meta=json.dumps({"label_names": "negative"}), fast=True)
    folder_task("meta a list", ERROR, meta=json.dumps(["neg", "pos"]))
    folder_task("meta one label", ERROR, meta=json.dumps({"label_names": ["only"]}))
    folder_task("meta duplicate labels", ERROR, meta=json.dumps({"label_names": ["a", "a"]}))
    folder_task("meta label_names objects", ERROR, meta=json.dumps({"label_names": [{"a": 1}, 2]}))
    folder_task("meta not UTF-8", ERROR, raw={"meta.json": b'{"label_names": ["n\xe9g", "pos"]}'})
    folder_task("empty validation file", ERROR, validation=[], fast=True)
    folder_task("empty train file", ERROR, train=[])
    folder_task("blank-line train file", ERROR, train=b"\n\n  \n")
    latin1 = _jsonl(
        [json.dumps({"text": f"caf\u00e9 {r['text']}", "label": r["label"]}, ensure_ascii=False) for r in good]
    ).encode("latin-1")
    folder_task("latin-1 train", ERROR, train=latin1, fast=True)
    folder_task("latin-1 train with task.encoding", OK, overrides=["task.encoding=latin-1"], train=latin1)
    folder_task("CRLF lines", OK, train=_jsonl(good).replace("\n", "\r\n").encode())
    folder_task("UTF-8 BOM", ANY, train=b"\xef\xbb\xbf" + _jsonl(good).encode())
    folder_task("binary garbage train", ERROR, train=bytes(random.Random(1).randrange(256) for _ in range(500)))

    header = "text,label\n"
    csv_good = header + "".join(f'"{r["text"]}, really",{r["label"]}\n' for r in good)
    file_task("csv good", OK, csv_good, ".csv", fast=True)
    file_task("csv extra cells", ERROR, csv_good + "too,many,cells\n", ".csv", fast=True)
    file_task("csv extra cells (skip)", OK, csv_good + "too,many,cells\n", ".csv", ["task.on_bad_row=skip"])
    file_task("csv missing text cell", ERROR, header + "only-one-cell\n" + csv_good[len(header) :], ".csv")
    file_task("csv empty text cell", ERROR, csv_good + ",1\n", ".csv")
    file_task("csv empty label cell", ERROR, csv_good + "text without label,\n", ".csv")
    file_task("csv semicolons (sniffed)", OK, csv_good.replace(",", ";").replace(";", ",", 0), ".csv")
    semicolons = "text;label\n" + "".join(f"{r['text']};{r['label']}\n" for r in good)
    file_task("csv semicolons (task.delimiter)", OK, semicolons, ".csv", ["task.delimiter=;"])
    file_task("csv tabs", OK, "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in good), ".csv")
    file_task("csv quoted newline", OK, header + '"two\nlines",1\n' + csv_good[len(header) :], ".csv")
    file_task("csv latin-1", ERROR, csv_good.replace("really", "caf\u00e9").encode("latin-1"), ".csv")
    file_task(
        "csv latin-1 with task.encoding",
        OK,
        csv_good.replace("really", "caf\u00e9").encode("latin-1"),
        ".csv",
        ["task.encoding=latin-1"],
    )
    file_task("csv header only", ERROR, header, ".csv")
    file_task("csv duplicate header", ERROR, "text,text,label\na,b,1\n", ".csv")
    file_task("csv unterminated quote", ANY, header + '"never closed,1\n' + csv_good[len(header) :], ".csv")
    file_task("jsonl good", OK, _jsonl(good))
    file_task("jsonl text_field missing", ERROR, _jsonl(good), overrides=["task.text_field=body"])
    file_task("jsonl label as text", ERROR, _jsonl(good), overrides=["task.text_field=label"])
    file_task("jsonl 1-class", ERROR, _jsonl([{**r, "label": "x"} for r in good]))
    file_task("jsonl NaN labels only", ERROR, "".join(f'{{"text": "t{i}", "label": NaN}}\n' for i in range(20)))

    def missing_validation_file(env, folder):
        path = folder / "rows.jsonl"
        path.write_text(_jsonl(good))
        return env.train_argv(folder, f"task.name={path}", f"task.validation_file={folder / 'none.jsonl'}")

    def validation_file_dir(env, folder):
        path = folder / "rows.jsonl"
        path.write_text(_jsonl(good))
        return env.train_argv(folder, f"task.name={path}", f"task.validation_file={folder}")

    cases += [
        Case("data:validation_file missing", "data", missing_validation_file, ERROR),
        Case("data:validation_file a folder", "data", validation_file_dir, ERROR),
        Case(
            "data:task is a folder without train.jsonl",
            "data",
            lambda env, folder: env.train_argv(folder, f"task.name={folder}"),
            ERROR,
        ),
        Case(
            "data:task file missing",
            "data",
            lambda env, folder: env.train_argv(folder, f"task.name={folder / 'none.jsonl'}"),
            ERROR,
        ),
    ]
    return cases


def _predict_cases() -> list[Case]:
    cases = []

    def case(
        name: str, expect: str, content: bytes | str | None, extra=(), suffix=".jsonl", output="out.jsonl", fast=False
    ):
        def build(env, folder):
            path = folder / f"in{suffix}"
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif content is not None:
                path.write_text(content)
            out = folder / output if output else folder
            return ["predict", str(env.adapter), "--input", str(path), "--output", str(out), *extra]

        cases.append(Case(f"predict:{name}", "predict", build, expect, fast))

    good = _jsonl([{"id": i, "text": f"row {i} was great"} for i in range(5)])
    case("good", OK, good, fast=True)
    case("non-UTF-8 input", ERROR, "caf\u00e9 {}\n".encode("latin-1"), fast=True)
    case("latin-1 JSON row", ERROR, json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"))
    case("--output is a directory", ERROR, good, output="", fast=True)
    case("input missing", ERROR, None)
    case("empty input", ERROR, "")  # nothing to predict: an empty output would look like a result
    case("null text", ERROR, '{"text": null}\n')
    case("object text", ERROR, '{"text": {"a": 1}}\n')
    case("lone surrogate", ERROR, '{"text": "\\ud800 broken"}\n', fast=True)
    case("100000 nested", ERROR, "[" * 100000 + "]" * 100000 + "\n")
    case("row is a list", ERROR, "[1, 2]\n")
    case("missing field", ERROR, '{"body": "x"}\n')
    case("invalid JSON", ERROR, "{text: x\n")
    case("--batch-size 0", ERROR, good, ["--batch-size", "0"])
    case("--batch-size -1", ERROR, good, ["--batch-size", "-1"])
    case("--batch-size abc", ERROR, good, ["--batch-size", "abc"])
    case("csv input", OK, "text\nfine\ngreat\n", suffix=".csv")
    case("csv extra cells", ERROR, "text\na,b\n", suffix=".csv")
    case("empty text", ANY, '{"text": ""}\n')

    def input_is_dir(env, folder):
        return ["predict", str(env.adapter), "--input", str(folder), "--output", str(folder / "o.jsonl")]

    cases.append(Case("predict:input is a directory", "predict", input_is_dir, ERROR))
    return cases


def _eval_cases() -> list[Case]:
    def run_of(env):
        return str(env.adapter.parent)

    return [
        Case("eval:--batch-size 0", "eval", lambda env, f: ["eval", run_of(env), "--batch-size", "0"], ERROR, True),
        Case("eval:--batch-size -1", "eval", lambda env, f: ["eval", run_of(env), "--batch-size", "-1"], ERROR),
        Case("eval:missing run", "eval", lambda env, f: ["eval", str(f / "nosuch")], ERROR),
        Case("eval:unknown split", "eval", lambda env, f: ["eval", run_of(env), "--split", "nosuch"], ERROR),
        Case("eval:good", "eval", lambda env, f: ["eval", run_of(env), "--split", "test"], OK),
    ]


def _adapter_cases() -> list[Case]:
    def damaged(change: Callable[[Path], None]):
        def build(env, folder):
            copy = folder / "adapter"
            shutil.copytree(env.adapter, copy)
            change(copy)
            (folder / "in.jsonl").write_text('{"text": "fine"}\n')
            return ["predict", str(copy), "--input", str(folder / "in.jsonl"), "--output", str(folder / "o.jsonl")]

        return build

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return [
        Case(
            "adapter:peftkit.json a list", "adapter", damaged(lambda a: (a / "peftkit.json").write_text("[1]")), ERROR
        ),
        Case(
            "adapter:peftkit.json not JSON", "adapter", damaged(lambda a: (a / "peftkit.json").write_text("{")), ERROR
        ),
        Case("adapter:peftkit.json missing", "adapter", damaged(lambda a: (a / "peftkit.json").unlink()), ERROR),
        Case(
            "adapter:weights truncated", "adapter", damaged(lambda a: truncate(a / "adapter_model.safetensors")), ERROR
        ),
        Case(
            "adapter:missing folder",
            "adapter",
            lambda env, f: ["predict", str(f / "none"), "--input", str(f / "x.jsonl")],
            ERROR,
        ),
    ]


def _resume_cases() -> list[Case]:
    def resume(*overrides: str, damage: Callable[[Path], None] | None = None, max_steps: int = 8):
        def build(env, folder):
            run = env.checkpointed_run(folder)
            if damage:
                damage(run)
            return ["train", "--resume", str(run), f"train.max_steps={max_steps}", *overrides]

        return build

    def flip_optimizer(run: Path) -> None:
        path = run / "checkpoints" / "step-0000004" / "optimizer.safetensors"
        data = bytearray(path.read_bytes())
        data[-20] ^= 0xFF
        path.write_bytes(bytes(data))

    def drop_state_key(run: Path) -> None:
        path = run / "checkpoints" / "step-0000004" / "state.json"
        state = json.loads(path.read_text())
        del state["scheduler"]
        path.write_text(json.dumps(state))

    def short_rng(run: Path) -> None:
        (run / "checkpoints" / "step-0000004" / "rng.safetensors").write_bytes(b"1234567")

    def damage_all(run: Path) -> None:
        for step in (run / "checkpoints").glob("step-*"):
            (step / "rng.safetensors").write_bytes(b"1234567")

    def only_tmp(run: Path) -> None:
        shutil.rmtree(run / "checkpoints")
        (run / "checkpoints" / ".step-0000002.abc123.tmp").mkdir(parents=True)

    def no_checkpoints(run: Path) -> None:
        shutil.rmtree(run / "checkpoints")

    return [
        Case("resume:raise max_steps", "resume", resume(), OK, True),
        Case("resume:train.lr changed", "resume", resume("train.lr=0.5"), ERROR, True),
        Case("resume:train.seed changed", "resume", resume("train.seed=3"), ERROR),
        Case("resume:train.batch_size changed", "resume", resume("train.batch_size=4"), ERROR),
        Case("resume:task.max_train_examples changed", "resume", resume("task.max_train_examples=20"), ERROR),
        Case("resume:method.r changed", "resume", resume("method.r=4"), ERROR),
        Case("resume:log/eval cadence changed", "resume", resume("train.log_every=2", "train.eval_every=3"), OK),
        Case("resume:flipped optimizer bytes (falls back)", "resume", resume(damage=flip_optimizer), OK, True),
        Case("resume:state.json missing a key (falls back)", "resume", resume(damage=drop_state_key), OK),
        Case("resume:7-byte RNG file (falls back)", "resume", resume(damage=short_rng), OK),
        Case("resume:every checkpoint damaged", "resume", resume(damage=damage_all), ERROR),
        Case("resume:only an interrupted .tmp", "resume", resume(damage=only_tmp), ERROR),
        Case("resume:no checkpoints", "resume", resume(damage=no_checkpoints), ERROR),
        Case("resume:budget already reached", "resume", resume(max_steps=3), ERROR),
        Case("resume:not a run folder", "resume", lambda env, f: ["train", "--resume", str(f)], ERROR),
    ]


def corpus() -> list[Case]:
    cases = (
        _override_cases()
        + _config_cases()
        + _data_cases()
        + _predict_cases()
        + _eval_cases()
        + _adapter_cases()
        + _resume_cases()
    )
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


# --------------------------------------------------------------------------------------------- running


def run_case(case: Case, env: FuzzEnv) -> Outcome:
    from peftkit.cli import main

    folder = env.root / "cases" / f"{abs(hash(case.id)):x}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    err, out = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    try:
        argv = case.build(env, folder)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), contextlib.chdir(folder):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
            except BaseException:  # noqa: BLE001 - a traceback is exactly what the corpus looks for
                rc = "exception"
                err.write(traceback.format_exc())
    finally:
        seconds = time.perf_counter() - started
    stderr = err.getvalue()
    lines = [line for line in stderr.splitlines() if line.strip()]
    why = ""
    if "Traceback" in stderr or rc == "exception":
        why = "traceback: " + (lines[-1] if lines else "")
    elif rc not in (0, 2):
        why = f"exit {rc}"
    elif rc == 2 and (len(lines) != 1 or not lines[0].startswith("peftkit: error:")):
        why = f"exit 2 with {len(lines)} stderr lines: {' | '.join(lines[:3])[:300]}"
    elif case.expect == OK and rc != 0:
        why = f"expected success, got: {lines[-1] if lines else rc}"
    elif case.expect == ERROR and rc != 2:
        why = "expected a one-line refusal, but it succeeded"
    return Outcome(case, rc, stderr, not why, why, seconds)


def run_corpus(root: Path, fast_only: bool = False, model_dir: Path | None = None) -> list[Outcome]:
    env = FuzzEnv(root, model_dir)
    return [run_case(c, env) for c in corpus() if c.fast or not fast_only]


def report(outcomes: list[Outcome]) -> str:
    from collections import Counter

    lines = [f"{sum(o.passed for o in outcomes)}/{len(outcomes)} cases pass ({sum(o.seconds for o in outcomes):.0f}s)"]
    by_kind = Counter((o.case.kind, o.passed) for o in outcomes)
    for kind in sorted({o.case.kind for o in outcomes}):
        lines.append(f"  {kind}: {by_kind[(kind, True)]} pass, {by_kind[(kind, False)]} fail")
    failures = Counter(
        (
            "traceback"
            if o.why.startswith("traceback")
            else "silently accepted"
            if "succeeded" in o.why
            else "refused a valid input"
            if o.why.startswith("expected success")
            else "multi-line error"
        )
        for o in outcomes
        if not o.passed
    )
    lines.append("  failures by kind: " + (", ".join(f"{k} {v}" for k, v in failures.items()) or "none"))
    lines += [f"  FAIL {o.case.id}: {o.why}" for o in outcomes if not o.passed]
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        results = run_corpus(Path(tmp), fast_only="--fast" in sys.argv)
        print(report(results))
