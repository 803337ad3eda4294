"""The server under hostile but fair use: a poisoned request fails alone, admin changes are atomic and idempotent,
a broken adapter is named, paths stay private, a failed load changes nothing."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import torch
from damage import WEIGHTS, copy_adapter, nan_lora, rehash, rewrite_tensors
from tiny_runs import TEXTS, TinyRuns

from peftkit.serve import AdapterPool, create_app

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, toy_task_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("PEFTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield TinyRuns(tmp_path_factory.mktemp("robust"), tiny_model_dir("bert"), toy_task_dir)
    mp.undo()


@pytest.fixture(scope="module")
def adapters(runs):
    return {
        "a": runs.run("lora", seed=0) / "adapter",
        "b": runs.run("lora", seed=1) / "adapter",
        "r4": runs.run("lora", seed=0, r=4) / "adapter",
        "ia3": runs.run("ia3") / "adapter",
    }


@pytest.fixture(scope="module")
def client(runs, adapters):
    from fastapi.testclient import TestClient

    pool = AdapterPool(str(runs.model_dir), bf16=False)  # module scope: conftest's "auto is fp32" is not on yet
    app = create_app(
        str(runs.model_dir),
        {n: str(adapters[n]) for n in ("a", "b", "ia3")},
        admin_token=TOKEN,
        max_batch=64,
        max_wait=0.05,
        pool=pool,
    )  # a long wait: concurrent requests share batches
    with TestClient(app) as c:
        yield c


def probs(reply):
    return torch.tensor([list(p["probabilities"].values()) for p in reply.json()["predictions"]])


def post(client, body):
    """As a JSON client sends it: lone surrogates escaped ("\\ud800"), which is valid JSON."""
    return client.post("/v1/classify", content=json.dumps(body), headers={"Content-Type": "application/json"})


def fire(client, bodies):
    with concurrent.futures.ThreadPoolExecutor(16) as threads:
        return list(threads.map(lambda b: post(client, b), bodies))


def reference(client, name):
    reply = client.post("/v1/classify", json={"adapter": name, "texts": TEXTS})
    assert reply.status_code == 200
    return probs(reply)


def test_lone_surrogate_fails_only_its_own_request(client):
    want = {n: reference(client, n) for n in ("a", "b", "ia3")}
    poison = {"adapter": "a", "texts": ["\ud800 broken"]}
    bodies = [{"adapter": n, "texts": TEXTS} for n in ("a", "b", "ia3") * 10]
    bodies[5:5] = [poison] * 3
    replies = fire(client, bodies)
    for body, reply in zip(bodies, replies):
        if body is poison:
            assert reply.status_code == 422 and "texts[0] is not valid Unicode" in reply.json()["detail"]
        else:
            assert reply.status_code == 200, reply.text
            assert torch.allclose(probs(reply), want[body["adapter"]], atol=1e-5)


def test_a_failing_batch_is_retried_one_by_one(client, monkeypatch):
    pool, batcher = client.app.state.pool, client.app.state.batcher
    poison_id = pool.tokenizer("zebra", add_special_tokens=False)["input_ids"][0]
    real_predict = pool.predict

    def predict(jobs, batch_size=64):  # a forward that dies on one request's rows, whatever it is batched with
        if any(poison_id in row for _, split, _ in jobs for row in split.features["input_ids"]):
            raise RuntimeError("simulated kernel failure")
        return real_predict(jobs, batch_size)

    monkeypatch.setattr(pool, "predict", predict)
    before = batcher.retried_batches
    bodies = [{"adapter": n, "texts": TEXTS} for n in ("a", "b", "ia3") * 8]
    bodies[7:7] = [{"adapter": "b", "texts": ["a zebra"]}]
    replies = fire(client, bodies)
    statuses = [r.status_code for r in replies]
    assert statuses[7] == 500 and "simulated kernel failure" in replies[7].json()["detail"]
    assert statuses[:7] + statuses[8:] == [200] * 24
    assert batcher.retried_batches > before  # the poisoned request really shared a batch with others


def test_broken_adapter_is_named_and_its_neighbours_unaffected(client, adapters, tmp_path):
    folder = copy_adapter(adapters["a"], tmp_path / "nan")
    rewrite_tensors(folder, nan_lora)
    assert client.post("/v1/adapters", json={"name": "broken", "path": str(folder)}, headers=AUTH).status_code == 201
    try:
        want = reference(client, "a")
        bodies = [{"adapter": n, "texts": TEXTS} for n in ("a", "broken") * 8]
        for body, reply in zip(bodies, fire(client, bodies)):
            if body["adapter"] == "broken":
                assert reply.status_code == 500
                detail = reply.json()["detail"]
                assert "'broken'" in detail and "non-finite" in detail and "the adapter is broken" in detail
            else:
                assert reply.status_code == 200 and torch.allclose(probs(reply), want, atol=1e-5)
    finally:
        client.delete("/v1/adapters/broken", headers=AUTH)


def test_concurrent_deletes_one_200_then_404s(client, adapters):
    assert (
        client.post("/v1/adapters", json={"name": "gone", "path": str(adapters["b"])}, headers=AUTH).status_code == 201
    )
    with concurrent.futures.ThreadPoolExecutor(5) as threads:
        replies = list(threads.map(lambda _: client.delete("/v1/adapters/gone", headers=AUTH), range(5)))
    assert sorted(r.status_code for r in replies) == [200, 404, 404, 404, 404]
    assert "gone" not in client.app.state.pool.deployments


def pool_state(pool):
    lora = pool.hosts["lora-2-pooler"].model
    return (
        sorted(pool.deployments),
        {k: sorted(h.deployments) for k, h in pool.hosts.items()},
        sorted(lora.peft_config),
        sorted(n for n, _ in lora.named_parameters()),
    )


def test_failed_load_leaves_the_pool_as_it_was(client, adapters, tmp_path):
    pool = client.app.state.pool
    bad = copy_adapter(adapters["a"], tmp_path / "bad")  # config says r=8, weights are r=4
    (bad / WEIGHTS).write_bytes((adapters["r4"] / WEIGHTS).read_bytes())
    rehash(bad)
    before = pool_state(pool)
    reply = client.post("/v1/adapters", json={"name": "x", "path": str(bad)}, headers=AUTH)
    assert reply.status_code == 400 and "size mismatch" in reply.json()["detail"]
    assert pool_state(pool) == before
    assert not any("x" in getattr(m, "lora_A", {}) for m in pool.hosts["lora-2-pooler"].model.modules())
    # the name is free: a good folder (here the r=4 LoRA itself) loads under it and serves
    assert (
        client.post("/v1/adapters", json={"name": "x", "path": str(adapters["r4"])}, headers=AUTH).status_code == 201
    )
    try:
        assert client.post("/v1/classify", json={"adapter": "x", "texts": TEXTS}).status_code == 200
        assert torch.allclose(reference(client, "a"), reference(client, "a"))
    finally:
        assert client.delete("/v1/adapters/x", headers=AUTH).status_code == 200
    assert pool_state(pool) == before


def test_malformed_meta_is_400(client, adapters, tmp_path):
    folder = copy_adapter(adapters["a"], tmp_path / "m")
    (folder / "peftkit.json").write_text('{"format_version": "1.2", "method": "lora", "task": 3}')
    reply = client.post("/v1/adapters", json={"name": "m", "path": str(folder)}, headers=AUTH)
    assert reply.status_code == 400 and "lacks base_model" in reply.json()["detail"]


def test_listing_shows_paths_only_to_the_admin(client, adapters):
    public = client.get("/v1/adapters")
    assert public.status_code == 200
    rows = public.json()["adapters"]
    assert {r["name"] for r in rows} >= {"a", "b", "ia3"} and all("labels" in r and "method" in r for r in rows)
    assert all("path" not in r for r in rows) and str(adapters["a"].parent.parent) not in public.text
    assert "/" not in client.get("/healthz").json()["base"]
    private = client.get("/v1/adapters", headers=AUTH).json()["adapters"]
    assert {r["name"]: r["path"] for r in private}["a"] == str(adapters["a"])
    assert all(
        "path" not in r for r in client.get("/v1/adapters", headers={"Authorization": "Bearer no"}).json()["adapters"]
    )
