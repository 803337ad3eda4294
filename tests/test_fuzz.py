"""Issue 11's promise, checked over a generated corpus (tests/fuzz_corpus.py): every hostile-but-fair input either
succeeds or exits 2 with exactly one line on stderr and no traceback; inputs that must be refused are refused.

A fast slice runs by default; the whole corpus (400+ cases, several minutes) with PEFTKIT_FUZZ=all.
"""

from __future__ import annotations

import os

import pytest
from fuzz_corpus import FuzzEnv, corpus, run_case

ALL = os.environ.get("PEFTKIT_FUZZ", "") == "all"
CASES = [c for c in corpus() if ALL or c.fast]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, monkeypatch_module):
    monkeypatch_module.setenv("PEFTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    return FuzzEnv(tmp_path_factory.mktemp("fuzz"), tiny_model_dir("bert"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_the_corpus_is_big_and_the_fast_slice_covers_every_kind():
    cases = corpus()
    assert len(cases) >= 200
    kinds = {c.kind for c in cases}
    assert kinds == {"override", "config", "data", "predict", "eval", "adapter", "resume"}
    assert {c.kind for c in cases if c.fast} == kinds - {"adapter"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_succeeds_or_is_one_line_exit_2(case, env):
    outcome = run_case(case, env)
    assert outcome.passed, f"{case.id}: {outcome.why}\n{outcome.stderr[-2000:]}"
