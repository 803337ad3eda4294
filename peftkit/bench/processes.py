"""The bench's processes: one bench per results folder (`folder_lock`), and each local cell in a spawned child
(`run_in_child`) that never outlives the driver (`die_with_parent`), so a killed bench leaves nothing running that
could race its rerun.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peftkit.bench.grid import CellJob
from peftkit.errors import PeftkitError

LOCK_FILE = ".bench.lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUT (OUT/.bench.lock, holding this process's pid) while the grid runs.

    Two benches on one folder would train into the same run folders and delete each other's adapters; the second
    one stops at once, naming the holder. The lock is the kernel's (flock), so a killed bench leaves none behind.
    Without fcntl (Windows) the bench runs unlocked and says so: a lock file of our own would outlive a killed bench
    and block its rerun.
    """
    try:
        import fcntl
    except ImportError:
        print(
            f"peftkit bench: warning: this platform has no fcntl file locks, so nothing stops a second bench on "
            f"{out}: run one bench per results folder at a time",
            file=sys.stderr,
        )
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise PeftkitError(
                f"{out} is in use by another peftkit bench (pid {holder}); wait for it to end, or give another --out"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            lock.seek(0)
            lock.truncate()
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_in_child(job: CellJob, target: Callable[[CellJob], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run `target` (default `execute`: measure the cell) in a fresh spawned process: its own peak RSS / CUDA
    peak, no state left. The child dies with this process (`die_with_parent`), even when this one is SIGKILLed."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(send, job, os.getpid(), target))
    child.start()
    send.close()
    try:
        try:
            kind, payload = receive.recv()
        except EOFError:
            kind, payload = "died", None
        child.join()
    except KeyboardInterrupt:  # Ctrl-C reaches the child too; make sure it is gone before we unwind
        child.terminate()
        child.join()
        raise
    if kind == "interrupted":
        raise KeyboardInterrupt
    if kind == "outcome":
        return payload
    return {"kind": "crash", "payload": f"the cell's process died with exit code {child.exitcode} (out of memory?)"}


def _child_main(send, job: CellJob, parent_pid: int, target: Callable[[CellJob], dict[str, Any]] | None) -> None:
    """The spawned process's entry point: measure the cell and send back one (kind, payload) message."""
    from peftkit.bench.executors import execute

    die_with_parent(parent_pid)
    try:
        send.send(("outcome", (target or execute)(job)))
    except KeyboardInterrupt:
        send.send(("interrupted", None))
    finally:
        send.close()


def die_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """End this process as soon as `parent_pid` (the bench driver) is gone.

    Why: an orphaned cell would train on into OUT/runs/<cell>/ while a rerun of the bench trains the same cell
    there. Linux: the kernel sends SIGKILL on the parent's death (PR_SET_PDEATHSIG); everywhere, a daemon thread
    also exits once the parent pid changes (reparented), which covers other systems and a parent that died first.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl: the thread below still watches
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
