"""The HTTP app: FastAPI routes and request models over an AdapterPool and its MicroBatcher.

    GET  /healthz                 status, base model, number of deployed adapters, precision (bf16 or fp32)
    GET  /v1/adapters             what is deployed (method, task, labels, metrics; paths with the admin token)
    POST /v1/classify             {"adapter", "texts", "text_pairs"?} -> predictions
    POST /v1/adapters             hot-load an adapter folder (admin token)
    DELETE /v1/adapters/{name}    unload one (admin token); 404 when it is not (or no longer) loaded

Every request is validated (sizes, UTF-8-encodable text: no lone surrogates) and tokenised on its own before it
joins a batch, so a bad request gets its own 4xx and never fails its neighbours: 422 invalid, 413 too large,
404 unknown adapter, 409 unloaded while queued, 500 only for that request's own failure, with a JSON `detail`
(e.g. "adapter 'x' produced non-finite outputs (NaN or inf); the adapter is broken ..."). A POSTed folder that
cannot be loaded is a 400 and leaves the served adapters exactly as they were.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

from pydantic import BaseModel, Field

from peftkit.errors import PeftkitError, short_error
from peftkit.modeling import portable_model_name
from peftkit.precision import precision_name
from peftkit.predict import BrokenAdapterError
from peftkit.serve.batcher import MicroBatcher
from peftkit.serve.pool import AdapterExistsError, AdapterPool, UnknownAdapterError


class ClassifyRequest(BaseModel):
    adapter: str = Field(description="name of a loaded adapter (GET /v1/adapters)")
    texts: list[str] = Field(description="1..max_batch texts, each at most max_chars characters")
    text_pairs: list[str] | None = Field(default=None, description="second texts, for sentence-pair adapters")


class LoadRequest(BaseModel):
    name: str = Field(description="name to serve it under: letters, digits, '_' or '-'")
    path: str = Field(description="adapter folder on the server's disk")


def create_app(
    base: str = "default",
    adapters: dict[str, str | Path] | None = None,
    admin_token: str | None = None,
    max_batch: int = 64,
    max_chars: int = 10000,
    allow_base_mismatch: bool = False,
    max_wait: float = 0.005,
    pool: AdapterPool | None = None,
    bf16: bool | None = None,
):
    """Build the FastAPI app serving `adapters` ({name: folder}); `pool` lets tests share one loaded base (then its
    precision applies). `bf16`: autocast or not; None = where it pays (as `peftkit predict`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Header, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    pool = pool or AdapterPool(base, allow_base_mismatch, bf16)
    for name, path in (adapters or {}).items():
        pool.add(name, path)
    batcher = MicroBatcher(pool, max_batch, max_wait)
    admin = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftkit-admin")

    @asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.stop()
        admin.shutdown(wait=False)

    public_base = portable_model_name(base)
    if Path(public_base).is_absolute():  # a local folder: show its name, not where it is on the server
        public_base = Path(public_base).name
    app = FastAPI(
        title="peftkit serve",
        version="1",
        lifespan=lifespan,
        description=f"Sequence classification with many adapters on one base ({public_base}).",
    )
    app.state.pool, app.state.batcher = pool, batcher

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse(status_code=422, content={"detail": f"invalid request: {problems}"})

    def check_admin(authorization: str | None) -> None:
        if not admin_token:
            raise HTTPException(403, "adapter hot-loading is disabled; start the server with --admin-token")
        if authorization != f"Bearer {admin_token}":
            raise HTTPException(401, "missing or wrong admin token (Authorization: Bearer <token>)")

    def unknown(name: str) -> HTTPException:
        return HTTPException(404, f"unknown adapter {name!r}; loaded: {', '.join(sorted(pool.deployments)) or 'none'}")

    def is_admin(authorization: str | None) -> bool:
        return bool(admin_token) and authorization == f"Bearer {admin_token}"

    @app.get("/healthz")
    async def healthz():
        return {
            "status": "ok",
            "base": public_base,
            "adapters": len(pool.deployments),
            "precision": precision_name(pool.bf16),
        }

    @app.get("/v1/adapters")
    async def list_adapters(authorization: str | None = Header(default=None)):
        private = is_admin(authorization)
        return {"adapters": [d.describe(private) for d in list(pool.deployments.values())]}

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        deployment = pool.deployments.get(req.adapter)
        if deployment is None:
            raise unknown(req.adapter)
        problem = request_problem(req, deployment.name, deployment.is_pair, max_batch, max_chars)
        if problem:
            raise HTTPException(*problem)
        try:  # tokenised here, alone: a text the tokenizer rejects fails this request, never a batch
            split = pool.encode_rows(deployment, req.texts, req.text_pairs)
        except Exception as e:
            raise HTTPException(422, f"cannot tokenize the texts: {short_error(e)}") from None
        result = await batcher.submit(deployment.name, split)
        if isinstance(result, UnknownAdapterError):
            raise HTTPException(409, str(result))
        if isinstance(result, BrokenAdapterError):
            raise HTTPException(500, str(result))
        if isinstance(result, Exception):
            raise HTTPException(500, f"classification failed for adapter {deployment.name!r}: {short_error(result)}")
        return {"adapter": deployment.name, "predictions": result}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(req: LoadRequest, authorization: str | None = Header(default=None)):
        check_admin(authorization)
        if req.name in pool.deployments:
            raise HTTPException(409, f"adapter {req.name!r} is already loaded; DELETE it first")
        try:  # the pool takes its admin lock, loads aside and swaps: a failed load changes nothing
            deployment = await asyncio.get_running_loop().run_in_executor(admin, pool.add, req.name, req.path)
        except AdapterExistsError as e:
            raise HTTPException(409, str(e)) from None
        except PeftkitError as e:
            raise HTTPException(400, str(e)) from None
        return deployment.describe()

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, authorization: str | None = Header(default=None)):
        check_admin(authorization)
        if name not in pool.deployments:
            raise unknown(name)
        try:
            await asyncio.get_running_loop().run_in_executor(admin, pool.remove, name)
        except UnknownAdapterError:  # removed by a concurrent DELETE meanwhile
            raise unknown(name) from None
        return {"unloaded": name}

    return app


def request_problem(
    req: ClassifyRequest, name: str, is_pair: bool, max_batch: int, max_chars: int
) -> tuple[int, str] | None:
    """(HTTP status, message) for a classify request the deployment cannot take, else None."""
    if not req.texts:
        return 422, "texts is empty; send 1 or more texts"
    if len(req.texts) > max_batch:
        return 413, f"{len(req.texts)} texts in one request; the limit is {max_batch} (--max-batch)"
    for field_name, values in (("texts", req.texts), ("text_pairs", req.text_pairs or [])):
        for i, text in enumerate(values):
            if len(text) > max_chars:
                return 413, f"{field_name}[{i}] has {len(text)} characters; the limit is {max_chars} (--max-chars)"
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate such as \ud800: JSON allows it, UTF-8 cannot
                return 422, (
                    f"{field_name}[{i}] is not valid Unicode text ({e.reason} at character {e.start}); "
                    "send UTF-8-encodable strings"
                )
    if is_pair and req.text_pairs is None:
        return 422, f"adapter {name!r} classifies sentence pairs; send text_pairs too"
    if not is_pair and req.text_pairs is not None:
        return 422, f"adapter {name!r} classifies single texts; drop text_pairs"
    if req.text_pairs is not None and len(req.text_pairs) != len(req.texts):
        return 422, f"{len(req.texts)} texts but {len(req.text_pairs)} text_pairs; send one pair per text"
    return None
