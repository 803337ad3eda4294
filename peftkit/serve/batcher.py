"""The micro-batcher: requests that arrive within a few milliseconds share one model pass.

An asyncio queue feeds one worker task; it waits ~5 ms after the first request for more (up to `max_batch`
texts), then runs the whole group through `AdapterPool.predict` on ONE dedicated inference thread, so the event
loop keeps accepting. Requests arrive already validated and tokenised (see app.py); if a batch fails anyway,
its jobs are retried one by one, so only the offending request gets an error.

Memory: one long-lived thread (not asyncio.to_thread's pool of up to 32) means one glibc malloc arena for all
inference; every `trim_every` batches the freed heap is handed back to the OS (`malloc_trim`), so resident
memory under sustained load stays at a plateau instead of ratcheting up with allocator fragmentation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import logging
import time
from dataclasses import dataclass
from typing import Any

from peftkit.data import EncodedSplit
from peftkit.serve.pool import AdapterPool, UnknownAdapterError

log = logging.getLogger("peftkit.serve")


@dataclass
class _Job:
    deployment: str
    split: EncodedSplit
    future: asyncio.Future

    @property
    def size(self) -> int:
        return len(self.split)


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


class MicroBatcher:
    """Groups requests that arrive within `max_wait` seconds (up to `max_batch` texts) into one model pass."""

    def __init__(self, pool: AdapterPool, max_batch: int = 64, max_wait: float = 0.005, trim_every: int = 64):
        """`trim_every`: batches between malloc_trim calls (0: never)."""
        self.pool, self.max_batch, self.max_wait, self.trim_every = pool, max_batch, max_wait, trim_every
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftkit-infer")
        self.trim = _malloc_trim()
        self.batches = 0
        self.retried_batches = 0

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop or self.task is None or self.task.done():
            self.loop, self.queue = loop, asyncio.Queue()
            self.task = loop.create_task(self._run())

    async def submit(self, deployment: str, split: EncodedSplit) -> list[dict[str, Any]] | Exception:
        """Predictions for one request's encoded rows, or the exception that request alone caused."""
        self._ensure_running()
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(deployment, split, future))
        return await future

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
            self.task = None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        queue = self.queue
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            size = jobs[0].size
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
                size += job.size
            try:
                results = await loop.run_in_executor(self.executor, self._predict, jobs)
            except Exception as e:  # _predict isolates failures; this is a last resort that keeps the worker alive
                results = [e] * len(jobs)
            self.batches += 1
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)

    def _predict(self, jobs: list[_Job]) -> list[list[dict[str, Any]] | Exception]:
        """Runs on the inference thread. One pass for the batch; if it fails, each job alone."""
        try:
            with self.pool.lock:
                live = [j for j in jobs if j.deployment in self.pool.deployments]
                try:
                    out = self.pool.predict([(j.deployment, j.split, None) for j in live], self.max_batch)
                except Exception:
                    log.exception("batch of %d requests failed; retrying them one by one", len(live))
                    self.retried_batches += 1
                    out = [self._alone(j) for j in live]
        finally:
            if self.trim is not None and self.trim_every and self.batches % self.trim_every == 0:
                self.trim(0)
        by_id = {id(j): r for j, r in zip(live, out)}
        return [by_id.get(id(j), UnknownAdapterError(f"adapter {j.deployment!r} was unloaded")) for j in jobs]

    def _alone(self, job: _Job) -> list[dict[str, Any]] | Exception:
        try:
            return self.pool.predict([(job.deployment, job.split, None)], self.max_batch)[0]
        except Exception as e:
            log.exception("request for adapter %r failed", job.deployment)
            return e
