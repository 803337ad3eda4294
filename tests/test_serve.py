"""The HTTP server: classify, list, health, mixed adapters in one stream, bad inputs (4xx), hot-load/unload."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import torch
from tiny_runs import TEXTS, TinyRuns, logits_of, three_label_task

from peftkit.artifacts import load
from peftkit.cli import main
from peftkit.precision import autocast
from peftkit.serve import AdapterPool, create_app

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, toy_task_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("PEFTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("serve")
    runs = TinyRuns(root, tiny_model_dir("bert"), toy_task_dir)
    runs.toy3 = three_label_task(root, toy_task_dir)
    yield runs
    mp.undo()


@pytest.fixture(scope="module")
def adapters(runs):
    return {
        "a": runs.run("lora", seed=0) / "adapter",
        "b": runs.run("lora", seed=1) / "adapter",
        "c": runs.run("lora", seed=2, task=runs.toy3) / "adapter",
        "ia3": runs.run("ia3") / "adapter",
        "bottleneck": runs.run("bottleneck") / "adapter",
    }


@pytest.fixture(scope="module")
def client(runs, adapters):
    from fastapi.testclient import TestClient

    pool = AdapterPool(str(runs.model_dir), bf16=False)  # module scope: conftest's "auto is fp32" is not on yet
    app = create_app(
        str(runs.model_dir),
        {k: str(v) for k, v in adapters.items() if k != "bottleneck"},
        admin_token=TOKEN,
        max_batch=8,
        max_chars=200,
        pool=pool,
    )
    with TestClient(app) as c:
        yield c


def expected_probs(adapter_dir, bf16=False):
    loaded = load(adapter_dir)
    with autocast(torch.device("cpu"), bf16):
        return torch.softmax(logits_of(loaded.model, loaded.tokenizer), -1)


def probs_of(predictions):
    return torch.tensor([list(p["probabilities"].values()) for p in predictions])


BF16_ATOL = 5e-3  # bf16 keeps 8 bits of mantissa: the tiny model's probabilities move ~3e-4, not 1e-7


def test_health_list_and_docs(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["precision"] == "fp32"
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert set(listed) == {"a", "b", "c", "ia3"}
    assert listed["c"]["labels"] == ["negative", "positive", "neutral"] and listed["ia3"]["method"] == "ia3"
    assert listed["a"]["mixed_batch"] and not listed["ia3"]["mixed_batch"]
    assert "accuracy" in listed["a"]["metrics"]["validation"]
    assert "/v1/classify" in client.get("/openapi.json").json()["paths"]


def test_classify_matches_each_adapter_loaded_alone(client, adapters):
    for name in ("a", "b", "c", "ia3"):
        body = client.post("/v1/classify", json={"adapter": name, "texts": TEXTS}).json()
        assert body["adapter"] == name
        want = expected_probs(adapters[name])
        for pred, p in zip(body["predictions"], want):
            assert pred["label"] == int(p.argmax())
            got = torch.tensor(list(pred["probabilities"].values()))
            assert torch.allclose(got, p, atol=1e-5), (name, got, p)


def test_concurrent_mixed_adapters_batch_together(client, adapters):
    want = {n: expected_probs(adapters[n]) for n in ("a", "b", "c", "ia3")}
    assert not torch.allclose(want["a"], want["b"], atol=1e-4)  # the two LoRAs really differ
    batcher = client.app.state.batcher
    before = batcher.batches
    names = ["a", "b", "a", "c", "ia3", "b"] * 4
    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        replies = list(
            threads.map(lambda n: (n, client.post("/v1/classify", json={"adapter": n, "texts": TEXTS[:2]})), names)
        )
    for name, reply in replies:
        assert reply.status_code == 200
        got = torch.tensor([list(p["probabilities"].values()) for p in reply.json()["predictions"]])
        assert torch.allclose(got, want[name][:2], atol=1e-5), name
    assert batcher.batches - before < len(names)  # the micro-batcher grouped some requests


def test_mixed_lora_forward_uses_each_adapters_own_head(client, adapters):
    pool = client.app.state.pool
    out = pool.predict([("a", TEXTS, None), ("b", TEXTS, None)])
    for name, preds in zip("ab", out):
        got = torch.tensor([list(p["probabilities"].values()) for p in preds])
        assert torch.allclose(got, expected_probs(adapters[name]), atol=1e-5)


def test_mixed_batch_on_a_head_peft_wraps_whole(tmp_path, monkeypatch, tiny_model_dir, toy_task_dir):
    """RoBERTa's classifier (dense + out_proj) is one module peft's mixed-batch inference refuses (TypeError):
    such LoRA adapters run as their own grouped forwards, and a batch mixing two gets each one's own logits."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    runs = TinyRuns(tmp_path, tiny_model_dir("roberta"), toy_task_dir)
    adapters = {"a": runs.run("lora", seed=0) / "adapter", "b": runs.run("lora", seed=1) / "adapter"}
    for bf16, atol in ((False, 1e-5), (True, BF16_ATOL)):
        pool = AdapterPool(str(runs.model_dir), bf16=bf16)
        for name, folder in adapters.items():
            pool.add(name, folder)
        out = pool.predict([("a", TEXTS, None), ("b", TEXTS, None)])
        for name, preds in zip("ab", out):
            assert torch.allclose(probs_of(preds), expected_probs(adapters[name], bf16), atol=atol), (bf16, name)
        assert not pool.deployments["a"].describe()["mixed_batch"]


@pytest.mark.parametrize("bf16", [False, True])
def test_serve_gives_what_predict_gives_in_either_precision(runs, adapters, bf16, tmp_path):
    """serve ran fp32 always while predict autocasts to bf16 where it pays, so the same adapter and text could get
    other probabilities (near a tie, another label). serve now follows predict's precision rule; each row of a
    batch mixing adapters (LoRA in one mixed pass, IA3 grouped) gets what `peftkit predict` gives for it alone."""
    pool = AdapterPool(str(runs.model_dir), bf16=bf16)
    names = ("a", "b", "c", "ia3")
    for name in names:
        pool.add(name, adapters[name])
    served = pool.predict([(name, TEXTS, None) for name in names])
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    for name, preds in zip(names, served):
        out = tmp_path / f"{name}.jsonl"
        argv = ["predict", str(adapters[name]), "--input", str(src), "--output", str(out)]
        assert main([*argv, "--bf16" if bf16 else "--no-bf16"]) == 0
        want = probs_of(json.loads(line) for line in out.read_text().splitlines())
        assert torch.allclose(probs_of(preds), want, atol=BF16_ATOL if bf16 else 1e-5), name
    same_as_fp32 = torch.allclose(probs_of(served[0]), expected_probs(adapters["a"]), atol=1e-6)
    assert same_as_fp32 is not bf16  # bf16 autocast really ran (or really did not)


@pytest.mark.parametrize(
    "payload,status,message",
    [
        ({"adapter": "nope", "texts": ["x"]}, 404, "unknown adapter"),
        ({"adapter": "a", "texts": []}, 422, "texts is empty"),
        ({"adapter": "a", "texts": ["x"] * 9}, 413, "limit is 8"),
        ({"adapter": "a", "texts": ["x" * 201]}, 413, "limit is 200"),
        ({"adapter": "a", "texts": ["x", "y"], "text_pairs": ["z"]}, 422, "single texts"),
        ({"adapter": "a"}, 422, "texts"),
        ({"adapter": "a", "texts": "not a list"}, 422, "texts"),
        ({"texts": ["x"]}, 422, "adapter"),
    ],
)
def test_bad_inputs_are_4xx_with_a_message(client, payload, status, message):
    reply = client.post("/v1/classify", json=payload)
    assert reply.status_code == status and message in reply.json()["detail"]


def test_malformed_json_is_422(client):
    reply = client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 422 and "invalid request" in reply.json()["detail"]


def test_hot_load_and_unload_need_the_token(client, adapters):
    body = {"name": "hot", "path": str(adapters["bottleneck"])}
    assert client.post("/v1/adapters", json=body).status_code == 401
    assert client.post("/v1/adapters", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    reply = client.post("/v1/adapters", json=body, headers=auth)
    assert reply.status_code == 201 and reply.json()["method"] == "bottleneck"
    assert client.post("/v1/adapters", json=body, headers=auth).status_code == 409
    got = client.post("/v1/classify", json={"adapter": "hot", "texts": TEXTS}).json()["predictions"]
    want = expected_probs(adapters["bottleneck"])
    assert torch.allclose(torch.tensor([list(p["probabilities"].values()) for p in got]), want, atol=1e-5)
    bad = client.post("/v1/adapters", json={"name": "bad", "path": "/does/not/exist"}, headers=auth)
    assert bad.status_code == 400 and "does not exist" in bad.json()["detail"]
    assert client.post("/v1/adapters", json={"name": "a.b", "path": body["path"]}, headers=auth).status_code == 400
    assert client.delete("/v1/adapters/hot").status_code == 401
    assert client.delete("/v1/adapters/hot", headers=auth).status_code == 200
    assert client.post("/v1/classify", json={"adapter": "hot", "texts": ["x"]}).status_code == 404
    assert client.delete("/v1/adapters/hot", headers=auth).status_code == 404
    # unloading one LoRA of the shared PeftModel leaves the other working
    assert client.delete("/v1/adapters/b", headers=auth).status_code == 200
    got = client.post("/v1/classify", json={"adapter": "a", "texts": TEXTS}).json()["predictions"]
    got = torch.tensor([list(p["probabilities"].values()) for p in got])
    assert torch.allclose(got, expected_probs(adapters["a"]), atol=1e-5)
    assert client.post("/v1/adapters", json={"name": "b", "path": str(adapters["b"])}, headers=auth).status_code == 201


def test_admin_disabled_without_token(runs, adapters, client):
    from fastapi.testclient import TestClient

    app = create_app(str(runs.model_dir), {}, pool=client.app.state.pool)  # no admin token
    c = TestClient(app)
    body = {"name": "x", "path": str(adapters["a"])}
    assert c.post("/v1/adapters", json=body, headers={"Authorization": "Bearer "}).status_code == 403
    assert c.delete("/v1/adapters/a").status_code == 403


def test_base_mismatch_refused(runs, tmp_path):
    from peftkit.errors import PeftkitError

    pool = AdapterPool(str(runs.model_dir))
    meta_path = runs.run("lora") / "adapter" / "peftkit.json"
    import json
    import shutil

    shutil.copytree(meta_path.parent, tmp_path / "x")
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"] = "0" * 64
    (tmp_path / "x" / "peftkit.json").write_text(json.dumps(meta))
    with pytest.raises(PeftkitError, match="allow-base-mismatch"):
        pool.add("x", tmp_path / "x")


def test_serve_says_what_it_serves_and_where_it_listens(runs, adapters, monkeypatch, capsys):
    """uvicorn at log_level=warning printed nothing: a user could not tell the server was up, or on which port."""
    import argparse

    import uvicorn

    from peftkit.cli import serve

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(kw))
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--base", str(runs.model_dir), "--adapter", f"a={adapters['a']}", "--port", "0"])
    assert serve.run(args) == 0
    out = capsys.readouterr().out
    assert "adapters: a;" in out and "POST /v1/classify" in out and "precision: fp32" in out  # auto: fp32 here
    # uvicorn's own "running on" line, and no line per request
    assert started["log_level"] == "info" and started["access_log"] is False
    assert serve.run(parser.parse_args(["--base", str(runs.model_dir), "--port", "0", "--bf16"])) == 0
    assert "precision: bf16" in capsys.readouterr().out
