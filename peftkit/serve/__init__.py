"""`peftkit serve`: many adapters on ONE copy of the base model, over HTTP (FastAPI + uvicorn).

pool.py     AdapterPool: the base loaded once, adapter folders deployed on it (shared body tensors, one
            mixed-batch PeftModel per LoRA label count), add/remove, grouped and mixed-batch predict
batcher.py  MicroBatcher: concurrent requests grouped into one model pass (~5 ms wait, bounded batch)
app.py      create_app: the FastAPI routes and request models
"""

from __future__ import annotations

from peftkit.serve.app import ClassifyRequest, LoadRequest, create_app
from peftkit.serve.batcher import MicroBatcher
from peftkit.serve.pool import NAME_PATTERN, AdapterPool, Deployment, HostModel

__all__ = [
    "NAME_PATTERN",
    "AdapterPool",
    "ClassifyRequest",
    "Deployment",
    "HostModel",
    "LoadRequest",
    "MicroBatcher",
    "create_app",
]
