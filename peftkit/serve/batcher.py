"""The micro-batcher: requests that arrive within a few milliseconds share one model pass.

An asyncio queue feeds one worker task; it waits ~5 ms after the first request for more (up to `max_batch`
texts), then runs the whole group through `AdapterPool.predict` in a thread, so the event loop keeps accepting.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.serve.pool import AdapterPool


@dataclass
class _Job:
    deployment: str
    texts: list[str]
    pairs: list[str] | None
    future: asyncio.Future


class MicroBatcher:
    """Groups requests that arrive within `max_wait` seconds (up to `max_batch` texts) into one model pass."""

    def __init__(self, pool: AdapterPool, max_batch: int = 64, max_wait: float = 0.005):
        self.pool, self.max_batch, self.max_wait = pool, max_batch, max_wait
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop or self.task is None or self.task.done():
            self.loop, self.queue = loop, asyncio.Queue()
            self.task = loop.create_task(self._run())

    async def submit(self, deployment: str, texts: list[str], pairs: list[str] | None) -> list[dict[str, Any]]:
        self._ensure_running()
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(deployment, texts, pairs, future))
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
        with self.pool.lock:
            live = [j for j in jobs if j.deployment in self.pool.deployments]
            out = self.pool.predict([(j.deployment, j.texts, j.pairs) for j in live], self.max_batch)
        by_id = {id(j): r for j, r in zip(live, out)}
        return [by_id.get(id(j), PeftkitError(f"adapter {j.deployment!r} was unloaded")) for j in jobs]
