"""`peftkit serve`: many adapters on ONE copy of the base model, over HTTP (FastAPI + uvicorn).

Memory: the base model's body tensors are loaded once. Plain LoRA adapters with the same number of labels live
in one `PeftModel` (`load_adapter(dir, adapter_name=name)`), each with its own head copy (peft's
ModulesToSaveWrapper keeps one per adapter), and a batch mixing them runs as ONE forward through peft's
mixed-batch inference (`adapter_names=[...]`). Every other adapter (DoRA, which peft cannot mix; IA3, AdaLoRA,
prompt methods, peftkit bottleneck adapters; LoRA with another label count) gets its own model object whose
body *shares the same tensors* as the base (only its head and adapter weights are new), and is run as its own
grouped forward. Only methods whose weights overwrite base parameters (full fine-tuning, BitFit) need a private
copy of the base: one full model per such adapter.

A micro-batcher (asyncio queue, ~5 ms wait, bounded batch) groups concurrent requests into one pass.
"""
from __future__ import annotations

import asyncio
import copy
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from peftkit.artifacts import attach, check_files, read_meta, verify_base
from peftkit.data import EncodedSplit, collate, encode
from peftkit.errors import PeftkitError
from peftkit.inference import predict_logits
from peftkit.modeling import head_modules, load_model, load_tokenizer, portable_model_name, resolve_model_path
from peftkit.predict import format_predictions

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # peft adapter names become ModuleDict keys: no dots


@dataclass
class Adapter:
    """One served adapter: where it lives in memory and what it expects."""

    name: str
    path: str
    meta: dict[str, Any]
    pool: str  # key of the model object that holds it

    @property
    def label_names(self) -> list[str]:
        return self.meta["task"]["label_names"]

    @property
    def is_pair(self) -> bool:
        return bool(self.meta["task"].get("is_pair"))

    def describe(self) -> dict[str, Any]:
        task = self.meta["task"]
        return {"name": self.name, "method": self.meta["method"], "task": task.get("name"), "labels": self.label_names,
                "is_pair": self.is_pair, "metrics": self.meta.get("metrics"), "base_model": self.meta.get("base_model"),
                "mixed_batch": self.pool.startswith("lora-"), "path": self.path}


@dataclass
class Pool:
    """A model object serving one or more adapters. `mixed`: a peft LoRA PeftModel usable with adapter_names."""

    model: nn.Module
    mixed: bool
    adapters: set[str] = field(default_factory=set)


class ServedAdapters:
    """Loads the base once and attaches, detaches and runs adapters on it. Not async: callers hold `lock`."""

    def __init__(self, base: str = "default", allow_base_mismatch: bool = False):
        from peftkit.config import ModelConfig

        self.base = base
        self.allow_base_mismatch = allow_base_mismatch
        self.model_cfg = ModelConfig(name_or_path=base)
        self.model_path = resolve_model_path(base)
        self.tokenizer = load_tokenizer(self.model_cfg)
        self.template = load_model(self.model_cfg, 2, self.tokenizer.pad_token_id).eval()
        self.heads = head_modules(self.template)
        self.adapters: dict[str, Adapter] = {}
        self.pools: dict[str, Pool] = {}
        self.lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- models

    def shared_model(self, num_labels: int) -> nn.Module:
        """A fresh *ForSequenceClassification object whose body tensors ARE the template's (no copy)."""
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(self.template.config)
        config.num_labels = num_labels
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
        for kind in ("parameters", "buffers"):
            for name, tensor in getattr(self.template, f"named_{kind}")(remove_duplicate=False):
                if name.split(".")[0] in self.heads:
                    continue
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                getattr(owner, f"_{kind}")[leaf] = tensor
        for head in self.heads:
            module = getattr(model, head).to_empty(device="cpu")
            for sub in module.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
        leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftovers:  # an architecture with state outside named tensors: fall back to a private copy
            return load_model(self.model_cfg, num_labels, self.tokenizer.pad_token_id)
        return model.eval()

    def _writes_base(self, directory: Path, meta: dict[str, Any]) -> bool:
        """True when the adapter's weights overwrite base parameters (full, BitFit): it needs a private base copy."""
        if meta.get("peft_format"):
            return False
        from safetensors import safe_open

        from peftkit.adapters.base import WEIGHTS_FILE

        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
            keys = set(f.keys())
        body = {n for n, _ in self.template.named_parameters() if n.split(".")[0] not in self.heads}
        return bool(keys & body)

    # ----------------------------------------------------------------------------------------- adapters

    def add(self, name: str, path: str | Path) -> Adapter:
        if not NAME_PATTERN.match(name or "") or name == "__base__":
            raise PeftkitError(f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-' (no dots)")
        if name in self.adapters:
            raise PeftkitError(f"adapter {name!r} is already loaded; DELETE it first")
        directory = Path(path)
        meta = read_meta(directory)
        verify_base(meta, self.base, self.allow_base_mismatch)
        check_files(directory, meta)
        num_labels = len(meta["task"]["label_names"])
        is_lora = meta.get("peft_format") and meta["method"] == "lora"
        try:
            if is_lora:
                key = f"lora-{num_labels}"
                pool = self.pools.get(key)
                if pool is None:
                    from peft import PeftModel

                    model = PeftModel.from_pretrained(self.shared_model(num_labels), str(directory), adapter_name=name,
                                                      is_trainable=False)
                    pool = self.pools[key] = Pool(model, mixed=True)
                else:
                    pool.model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
            else:
                key = f"own-{name}"
                base = (load_model(self.model_cfg, num_labels, self.tokenizer.pad_token_id)
                        if self._writes_base(directory, meta) else self.shared_model(num_labels))
                model, _ = attach(base, directory, meta, self.model_path)
                pool = self.pools[key] = Pool(model, mixed=False)
        except PeftkitError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise PeftkitError(f"cannot load adapter {directory}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        pool.model.eval()
        pool.adapters.add(name)
        adapter = self.adapters[name] = Adapter(name, str(directory), meta, key)
        return adapter

    def remove(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        pool = self.pools[adapter.pool]
        pool.adapters.discard(name)
        if not pool.adapters:
            del self.pools[adapter.pool]
        elif pool.mixed:
            if name in pool.model.peft_config and pool.model.active_adapter == name:
                pool.model.set_adapter(sorted(pool.adapters)[0])
            pool.model.delete_adapter(name)

    # ----------------------------------------------------------------------------------------- inference

    def encode_rows(self, adapter: Adapter, texts: list[str], pairs: list[str] | None) -> EncodedSplit:
        rows = [{"text": t, **({"text_pair": p} if pairs else {})} for t, p in zip(texts, pairs or texts)]
        return encode(rows, self.tokenizer, adapter.meta["task"].get("max_length") or 512)

    @torch.inference_mode()
    def predict(self, jobs: list[tuple[str, list[str], list[str] | None]], batch_size: int = 64) -> list[list[dict[str, Any]]]:
        """Predictions for several (adapter, texts, pairs) jobs at once: one mixed forward per LoRA pool,
        one grouped forward per other adapter."""
        results: list[list[dict[str, Any]] | None] = [None] * len(jobs)
        by_pool: dict[str, list[int]] = {}
        for i, (name, _, _) in enumerate(jobs):
            by_pool.setdefault(self.adapters[name].pool, []).append(i)
        for key, indices in by_pool.items():
            pool = self.pools[key]
            splits = [self.encode_rows(self.adapters[jobs[i][0]], jobs[i][1], jobs[i][2]) for i in indices]
            merged = _concat(splits)
            if pool.mixed:
                names = [jobs[i][0] for i, s in zip(indices, splits) for _ in range(len(s))]
                logits = _mixed_logits(pool.model, merged, names, batch_size)
            else:
                logits = predict_logits(pool.model, merged, batch_size, torch.device("cpu"))
            start = 0
            for i, split in zip(indices, splits):
                chunk = logits[start:start + len(split)]
                start += len(split)
                results[i] = format_predictions(chunk, self.adapters[jobs[i][0]].label_names)
        return results  # type: ignore[return-value]


def _concat(splits: list[EncodedSplit]) -> EncodedSplit:
    keys = splits[0].features.keys()
    return EncodedSplit({k: [row for s in splits for row in s.features[k]] for k in keys}, None, splits[0].pad_token_id)


def _mixed_logits(model: nn.Module, split: EncodedSplit, names: list[str], batch_size: int) -> torch.Tensor:
    """peft mixed-batch inference: row i goes through adapter names[i] (LoRA layers and its own head)."""
    out = []
    for start in range(0, len(split), batch_size):
        idx = list(range(start, min(start + batch_size, len(split))))
        batch = collate(split, idx)
        out.append(model(**batch, adapter_names=[names[i] for i in idx]).logits.float())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------- batcher


@dataclass
class _Job:
    adapter: str
    texts: list[str]
    pairs: list[str] | None
    future: asyncio.Future


class MicroBatcher:
    """Groups requests that arrive within `max_wait` seconds (up to `max_batch` texts) into one model pass."""

    def __init__(self, hub: ServedAdapters, max_batch: int = 64, max_wait: float = 0.005):
        self.hub, self.max_batch, self.max_wait = hub, max_batch, max_wait
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop or self.task is None or self.task.done():
            self.loop, self.queue = loop, asyncio.Queue()
            self.task = loop.create_task(self._run())

    async def submit(self, adapter: str, texts: list[str], pairs: list[str] | None) -> list[dict[str, Any]]:
        self._ensure_running()
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(adapter, texts, pairs, future))
        return await future

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
            self.task = None

    async def _run(self) -> None:
        queue = self.queue
        while True:
            jobs = [await queue.get()]
            size = len(jobs[0].texts)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                size += len(job.texts)
            try:
                results = await asyncio.to_thread(self._predict, jobs)
            except Exception as e:  # a failing batch fails its own requests, never the worker
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            self.batches += 1
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)

    def _predict(self, jobs: list[_Job]) -> list[list[dict[str, Any]]]:
        with self.hub.lock:
            live = [j for j in jobs if j.adapter in self.hub.adapters]
            out = self.hub.predict([(j.adapter, j.texts, j.pairs) for j in live], self.max_batch)
        by_id = {id(j): r for j, r in zip(live, out)}
        return [by_id.get(id(j), PeftkitError(f"adapter {j.adapter!r} was unloaded")) for j in jobs]


# --------------------------------------------------------------------------------------------- app


class ClassifyRequest(BaseModel):
    adapter: str = Field(description="name of a loaded adapter (GET /v1/adapters)")
    texts: list[str] = Field(description="1..max_batch texts, each at most max_chars characters")
    text_pairs: list[str] | None = Field(default=None, description="second texts, for sentence-pair adapters")


class LoadRequest(BaseModel):
    name: str = Field(description="name to serve it under: letters, digits, '_' or '-'")
    path: str = Field(description="adapter folder on the server's disk")



def create_app(base: str = "default", adapters: dict[str, str | Path] | None = None, admin_token: str | None = None,
               max_batch: int = 64, max_chars: int = 10000, allow_base_mismatch: bool = False, max_wait: float = 0.005,
               hub: ServedAdapters | None = None):
    """Build the FastAPI app; `hub` lets tests share one loaded base between apps."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Header, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    hub = hub or ServedAdapters(base, allow_base_mismatch)
    for name, path in (adapters or {}).items():
        hub.add(name, path)
    batcher = MicroBatcher(hub, max_batch, max_wait)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.stop()

    app = FastAPI(title="peftkit serve", version="1", lifespan=lifespan,
                  description=f"Sequence classification with many adapters on one base ({portable_model_name(base)}).")
    app.state.hub, app.state.batcher = hub, batcher

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(status_code=422, content={"detail": f"invalid request: {problems}"})

    def check_admin(authorization: str | None) -> None:
        if not admin_token:
            raise HTTPException(403, "adapter hot-loading is disabled; start the server with --admin-token")
        if authorization != f"Bearer {admin_token}":
            raise HTTPException(401, "missing or wrong admin token (Authorization: Bearer <token>)")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "base": portable_model_name(base), "adapters": len(hub.adapters)}

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"adapters": [a.describe() for a in hub.adapters.values()]}

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        adapter = hub.adapters.get(req.adapter)
        if adapter is None:
            raise HTTPException(404, f"unknown adapter {req.adapter!r}; loaded: {', '.join(sorted(hub.adapters)) or 'none'}")
        if not req.texts:
            raise HTTPException(422, "texts is empty; send 1 or more texts")
        if len(req.texts) > max_batch:
            raise HTTPException(413, f"{len(req.texts)} texts in one request; the limit is {max_batch} (--max-batch)")
        for field_name, values in (("texts", req.texts), ("text_pairs", req.text_pairs or [])):
            for i, text in enumerate(values):
                if len(text) > max_chars:
                    raise HTTPException(413, f"{field_name}[{i}] has {len(text)} characters; the limit is {max_chars} (--max-chars)")
        if adapter.is_pair and req.text_pairs is None:
            raise HTTPException(422, f"adapter {adapter.name!r} classifies sentence pairs; send text_pairs too")
        if not adapter.is_pair and req.text_pairs is not None:
            raise HTTPException(422, f"adapter {adapter.name!r} classifies single texts; drop text_pairs")
        if req.text_pairs is not None and len(req.text_pairs) != len(req.texts):
            raise HTTPException(422, f"{len(req.texts)} texts but {len(req.text_pairs)} text_pairs; send one pair per text")
        try:
            predictions = await batcher.submit(adapter.name, req.texts, req.text_pairs)
        except PeftkitError as e:
            raise HTTPException(409, str(e)) from None
        if isinstance(predictions, Exception):
            raise HTTPException(409, str(predictions))
        return {"adapter": adapter.name, "predictions": predictions}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(req: LoadRequest, authorization: str | None = Header(default=None)):
        check_admin(authorization)
        if req.name in hub.adapters:
            raise HTTPException(409, f"adapter {req.name!r} is already loaded; DELETE it first")

        def work():
            with hub.lock:
                return hub.add(req.name, req.path)

        try:
            adapter = await asyncio.to_thread(work)
        except PeftkitError as e:
            raise HTTPException(400, str(e)) from None
        return adapter.describe()

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, authorization: str | None = Header(default=None)):
        check_admin(authorization)
        if name not in hub.adapters:
            raise HTTPException(404, f"unknown adapter {name!r}; loaded: {', '.join(sorted(hub.adapters)) or 'none'}")

        def work():
            with hub.lock:
                hub.remove(name)

        await asyncio.to_thread(work)
        return {"unloaded": name}

    return app
