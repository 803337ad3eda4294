"""Bench executors: the smoke grid on a local 2-worker Ray cluster and through submitit's local executor gives the
same metrics as the local executor; a Ray worker that dies is retried once and fails only its cell; Ray stays an
optional extra."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from peftkit.bench import run_bench
from peftkit.bench.executors import LocalExecutor
from peftkit.bench.grid import Cell, CellJob
from peftkit.cli import main

# what must not depend on where a cell ran (times, memory and the machine may)
SAME = (
    "validation",
    "test",
    "final_validation",
    "kept_step",
    "trainable_params",
    "total_params",
    "adapter_bytes",
    "steps",
    "examples_seen",
    "task_metrics",
)


@pytest.fixture(scope="module")
def grid(tiny_model_dir, toy_task_dir):
    """The smoke profile on a tiny BERT: one task x 2 methods x 2 seeds = 4 cells."""
    return {
        "profile_name": "smoke",
        "tasks": [str(toy_task_dir)],
        "methods": ["lora", "bitfit"],
        "seeds": [0, 1],
        "model": str(tiny_model_dir("bert")),
        "progress": False,
    }


@pytest.fixture(scope="module")
def local_cells(grid, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:  # for this module's cells, in any executor's processes
        env.setenv("OMP_NUM_THREADS", "1")  # one thread per cell, as a Ray task asking for 1 CPU gets
        out = tmp_path_factory.mktemp("local")
        started = time.perf_counter()
        counts = run_bench(out=out, executor=LocalExecutor(), **grid)
        seconds = time.perf_counter() - started
        assert counts == {"planned": 4, "skipped": 0, "ran": 4, "retried": 0, "failed": 0}
        yield read_cells(out), seconds


def read_cells(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}


def assert_same_metrics(cells: dict[str, dict], reference: dict[str, dict]) -> None:
    assert cells.keys() == reference.keys()
    for name, cell in cells.items():
        assert cell["status"] == "ok", cell["error"]
        for key in SAME:
            assert cell[key] == reference[name][key], (name, key)


@pytest.mark.integration
def test_ray_two_workers_match_local_and_resume(grid, local_cells, tmp_path):
    ray = pytest.importorskip("ray")
    from peftkit.bench.executors import RayExecutor

    reference, local_seconds = local_cells
    timings = {"local (1 at a time)": local_seconds}
    try:
        for workers in (2, 1):
            out = tmp_path / f"ray{workers}"
            executor = RayExecutor(cpus_per_cell=2 // workers, num_cpus=2)  # a local cluster of 2 CPUs
            started = time.perf_counter()
            counts = run_bench(out=out, executor=executor, **grid)
            timings[f"ray, {workers} worker(s)"] = time.perf_counter() - started
            assert counts == {"planned": 4, "skipped": 0, "ran": 4, "retried": 0, "failed": 0}
            if workers == 2:  # 1 CPU per task = 1 thread, as the local cells had: bitwise the same metrics
                assert_same_metrics(read_cells(out), reference)
                mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
                assert run_bench(out=out, executor=executor, **grid)["ran"] == 0  # resume: nothing reruns
                assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == mtimes
            executor.shutdown()
    finally:
        ray.shutdown()
    print("\nwall seconds for 4 smoke cells: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


def _job(tmp_path: Path, method: str) -> CellJob:
    return CellJob(Cell("toy", method, 0), {}, (), tmp_path / method, 1, 1)


def test_ray_worker_death_is_retried_once_and_fails_only_its_cell(tmp_path):
    ray = pytest.importorskip("ray")
    from peftkit.bench.executors import RayExecutor

    def target(job):  # each attempt runs in a fresh worker process (max_calls=1)
        job.run_dir.mkdir(parents=True, exist_ok=True)
        attempts = len(list(job.run_dir.iterdir()))
        (job.run_dir / f"attempt{attempts}").touch()
        if job.cell.method == "doomed" or (job.cell.method == "flaky" and attempts == 0):
            os._exit(1)  # the worker dies, as under the OOM killer
        return {"kind": "ok", "payload": {"attempts": attempts + 1}, "seconds": 0.0}

    try:
        executor = RayExecutor(num_cpus=2, target=target)
        outcomes = {
            job.cell.method: o for job, o in executor.run([_job(tmp_path, m) for m in ("fine", "flaky", "doomed")])
        }
    finally:
        ray.shutdown()
    assert outcomes["fine"]["payload"] == {"attempts": 1}
    assert outcomes["flaky"]["payload"] == {"attempts": 2}
    assert outcomes["doomed"]["kind"] == "crash" and "retried once" in outcomes["doomed"]["payload"]
    assert len(list((tmp_path / "doomed").iterdir())) == 2


@pytest.mark.integration
def test_slurm_through_submitit_local_executor_matches_local(grid, local_cells, tmp_path):
    pytest.importorskip("submitit")
    from peftkit.bench.executors import SlurmExecutor

    out = tmp_path / "slurm"
    executor = SlurmExecutor(out / "submitit", cluster="local", timeout_min=10)
    counts = run_bench(out=out, executor=executor, **grid)
    assert counts == {"planned": 4, "skipped": 0, "ran": 4, "retried": 0, "failed": 0}
    assert_same_metrics(read_cells(out), local_cells[0])


@pytest.mark.parametrize("executor, extra", [("ray", "ray"), ("slurm", "slurm")])
def test_missing_extra_is_a_one_line_error(executor, extra, toy_task_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray" if executor == "ray" else "submitit", None)  # import fails
    argv = [
        "bench",
        "--profile",
        "smoke",
        "--tasks",
        str(toy_task_dir),
        "--methods",
        "lora",
        "--executor",
        executor,
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"pip install 'peftkit[{extra}]'" in err and len(err.strip().splitlines()) == 1


def test_local_executor_takes_no_cluster_flags(toy_task_dir, tmp_path, capsys):
    argv = [
        "bench",
        "--profile",
        "smoke",
        "--tasks",
        str(toy_task_dir),
        "--methods",
        "lora",
        "--address",
        "x:1",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    assert "need --executor ray or slurm" in capsys.readouterr().err


DRIVER = """
import os, sys, time
from pathlib import Path
from peftkit.bench.processes import run_in_child

def block(pid_file):
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    run_in_child(sys.argv[1], target=block)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_cell_process_dies_with_its_killed_driver(tmp_path):
    import signal
    import subprocess

    (tmp_path / "driver.py").write_text(DRIVER)
    pid_file = tmp_path / "cell.pid"
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(pid_file)])
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    cell = int(pid_file.read_text())
    driver.kill()  # SIGKILL: the driver runs no cleanup
    driver.wait()
    deadline = time.monotonic() + 10
    while _alive(cell) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphaned = _alive(cell)
    if orphaned:
        os.kill(cell, signal.SIGKILL)
    assert not orphaned
