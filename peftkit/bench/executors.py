"""Where bench cells run: here one after another (local), as Ray tasks on a Ray cluster, or as Slurm jobs (submitit).

An executor takes the cells' jobs and yields `(job, outcome)` as each cell finishes, in any order. The outcome is
plain data made where the cell ran, by `execute` (or, locally, by the spawned child):
`{"kind": "ok" | "peftkit" | "crash", "payload": measurements or an error message, "seconds": wall time}`.
The driver (runner.py) alone turns outcomes into records and writes the cell files, atomically, as they arrive, so
resuming works the same on every executor: a cell with a file is done, any other cell runs again.

Every executor gives a cell a fresh process (Ray: a worker that runs one task and exits, `max_calls=1`), so peak
memory is the cell's own and a crash ends only that cell. A process that dies (OOM killer, segfault, a lost node)
is retried once; a cell whose code fails is not retried, it is recorded as failed.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from peftkit.bench.grid import CellJob
from peftkit.errors import PeftkitError, short_error

EXECUTORS = ("local", "ray", "slurm")
Outcome = dict[str, Any]


class Executor(Protocol):
    def run(self, jobs: list[CellJob]) -> Iterator[tuple[CellJob, Outcome]]: ...


def execute(job: CellJob) -> Outcome:
    """Train and measure one cell in this process; any failure becomes an outcome, never an exception."""
    import shutil

    from peftkit.bench.runner import measure_cell
    from peftkit.console import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    shutil.rmtree(job.run_dir, ignore_errors=True)  # leftovers of an interrupted attempt
    try:
        outcome = {"kind": "ok", "payload": measure_cell(job)}
    except PeftkitError as e:
        outcome = {"kind": "peftkit", "payload": str(e)}
    except Exception as e:  # noqa: BLE001 - a bench cell records any crash and the grid goes on
        outcome = {"kind": "crash", "payload": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"}
    outcome["seconds"] = round(time.perf_counter() - started, 1)
    return outcome


class LocalExecutor:
    """Today's behaviour: one cell at a time, each in its own spawned process on this machine."""

    def run(self, jobs: list[CellJob]) -> Iterator[tuple[CellJob, Outcome]]:
        from peftkit.bench.processes import run_in_child

        for job in jobs:
            started = time.perf_counter()
            outcome = run_in_child(job)
            outcome["seconds"] = round(time.perf_counter() - started, 1)
            yield job, outcome


class RayExecutor:
    """Each cell a Ray task asking for `cpus_per_cell` / `gpus_per_cell`; no address starts a local cluster.

    On a cluster of several machines, OUT/runs/<cell>/ (config, metrics, summary) stays on the machine that ran the
    cell unless OUT is a shared folder; the cell files, written by this driver, hold what the tables need.
    """

    def __init__(
        self,
        address: str | None = None,
        cpus_per_cell: float = 1,
        gpus_per_cell: float = 0,
        num_cpus: int | None = None,
        target: Callable[[CellJob], Outcome] = execute,
    ):
        self.ray = require("ray", "ray")
        self.address, self.num_cpus = address, num_cpus
        self.remote = self.ray.remote(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=1, max_calls=1)(
            target
        )

    def run(self, jobs: list[CellJob]) -> Iterator[tuple[CellJob, Outcome]]:
        if jobs and not self.ray.is_initialized():  # a resumed grid with nothing left to run starts no cluster
            if self.address:
                self.ray.init(address=self.address, log_to_driver=False)
            else:
                # a local cluster lives on this machine: keep its sockets on loopback, not on the network interface
                self.ray.init(
                    num_cpus=self.num_cpus or os.cpu_count(),
                    include_dashboard=False,
                    log_to_driver=False,
                    _node_ip_address="127.0.0.1",
                )
        pending = {self.remote.remote(job): job for job in jobs}
        while pending:
            [ref], _ = self.ray.wait(list(pending), num_returns=1)
            job = pending.pop(ref)
            try:
                yield job, self.ray.get(ref)
            except self.ray.exceptions.RayError as e:  # the worker died twice (it was retried once)
                yield (
                    job,
                    {
                        "kind": "crash",
                        "payload": f"the cell's Ray worker died (retried once): {short_error(e)}",
                        "seconds": None,
                    },
                )

    def shutdown(self) -> None:
        self.ray.shutdown()


class SlurmExecutor:
    """Each cell a Slurm job through submitit (`cluster="local"` runs them as local processes, for tests).

    submitit moves the job and its outcome through pickle files in OUT/submitit/: keep that folder private.
    """

    def __init__(
        self,
        folder: Path,
        cpus_per_cell: int = 1,
        gpus_per_cell: int = 0,
        partition: str | None = None,
        timeout_min: int = 120,
        cluster: str | None = None,
        target: Callable[[CellJob], Outcome] = execute,
    ):
        submitit = require("submitit", "slurm")
        self.submitit, self.target = submitit, target
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        params: dict[str, Any] = {
            "cpus_per_task": int(cpus_per_cell),
            "timeout_min": timeout_min,
            "name": "peftkit-bench",
        }
        if gpus_per_cell:
            params["gpus_per_node"] = int(gpus_per_cell)
        if partition:
            params["slurm_partition"] = partition
        self.executor.update_parameters(**params)

    def run(self, jobs: list[CellJob]) -> Iterator[tuple[CellJob, Outcome]]:
        pending = {self.executor.submit(self.target, job): (job, 0) for job in jobs}
        while pending:
            done = [j for j in pending if j.done()]
            if not done:
                time.sleep(1.0)
                continue
            for submitted in done:
                job, retries = pending.pop(submitted)
                try:
                    yield job, submitted.result()
                except (self.submitit.core.utils.FailedJobError, self.submitit.core.utils.UncompletedJobError) as e:
                    if retries == 0:  # the job's process died: submit it once more
                        pending[self.executor.submit(self.target, job)] = (job, 1)
                    else:
                        yield (
                            job,
                            {
                                "kind": "crash",
                                "payload": f"the cell's Slurm job died (retried once): {short_error(e)}",
                                "seconds": None,
                            },
                        )


def make_executor(
    name: str,
    out: Path,
    address: str | None = None,
    cpus_per_cell: float | None = None,
    gpus_per_cell: float | None = None,
    partition: str | None = None,
) -> Executor:
    if name == "local":
        if address or gpus_per_cell or cpus_per_cell or partition:
            raise PeftkitError(
                "--address, --cpus-per-cell, --gpus-per-cell and --slurm-partition need --executor ray or slurm"
            )
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, cpus_per_cell or 1, gpus_per_cell or 0)
    if name == "slurm":
        return SlurmExecutor(out / "submitit", int(cpus_per_cell or 1), int(gpus_per_cell or 0), partition)
    raise PeftkitError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


def require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PeftkitError(
            f"--executor {'slurm' if extra == 'slurm' else extra} needs {module}: pip install 'peftkit[{extra}]'"
        ) from None
