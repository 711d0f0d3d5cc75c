"""A training that runs in a second process beside the main one: the refit on all rows trains
while the validation run trains, each with half of the CPU threads.

Why: on a few CPU cores one training of the default Rossmann network does not keep two intra-op
threads busy (the matmuls at batch 512 are small, and the rest of a step is many short ops), so
two single-threaded trainings side by side finish sooner than the same two one after the other
with two threads each (docs/benchmarks.md, "Validation run and refit side by side").

The worker is a *spawned* process (never forked: a fork would copy the parent's OpenMP thread pool
in a state the child cannot use). It gets a picklable function and its arguments; tensors travel
through shared memory (torch's multiprocessing reducers); the result comes back as `torch.save`
bytes (a shared-memory handle would need the worker alive after it exits). Messages the worker
`report`s (per-epoch logs) reach the parent as they happen (`on_progress`, called from a reader
thread), so a long refit still shows progress. A worker whose parent is gone exits by itself. An
exception in the worker is re-raised in the parent as `BackgroundError` with the worker's
traceback; a worker that dies (killed, out of memory) is an error too, never a silent empty
result. `cancel()` terminates it.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import resource
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from modeling.training.callbacks import Callback
from modeling.training.data import TensorData
from modeling.training.ensemble import Members, train_members

__all__ = ["BackgroundError", "BackgroundFit", "split_threads", "train_members_worker"]

log = logging.getLogger("tabrec.train")

Report = Callable[[tuple[Any, ...]], None]


class BackgroundError(RuntimeError):
    """The background training failed: its exception (with the worker's traceback) or its exit."""


def split_threads(threads: int) -> tuple[int, int] | None:
    """(main, worker) torch threads for two trainings side by side out of `threads`, or None when
    there are fewer than two (one thread is the user's or the machine's whole budget)."""
    if threads < 2:
        return None
    worker = threads // 2
    return threads - worker, worker


def _exit_with_parent(parent: int) -> None:
    """Ends this worker when its parent is gone (killed with SIGKILL, say): daemon processes are
    stopped only by a parent that exits normally, and an orphan would train on for minutes."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _child(conn: Any, fn: Callable[..., Any], args: Sequence[Any], threads: int, parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent watch", daemon=True).start()
    torch.set_num_threads(threads)

    def report(message: tuple[Any, ...]) -> None:
        conn.send(("progress", message))

    try:
        result = fn(*args, report=report)
        # as bytes: tensors sent as shared-memory handles would need this process alive while the
        # parent unpickles them, and it exits right after sending
        buf = io.BytesIO()
        torch.save(result, buf)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    else:
        conn.send(("done", buf.getvalue()))
    finally:
        conn.close()


class BackgroundFit:
    """`fn(*args, report=...)` in a spawned process with `threads` torch threads; `result()` waits.

    `fn` must be a module-level function (and `args` picklable); it may call `report(message)`
    with a small tuple, which the parent hands to `on_progress` as it arrives."""

    def __init__(self, fn: Callable[..., Any], args: Sequence[Any], *, threads: int, name: str = "background fit",
                 on_progress: Callable[[tuple[Any, ...]], None] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        recv, send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_child, args=(send, fn, tuple(args), threads, os.getpid()), name=name,
                                    daemon=True)
        self._process.start()
        send.close()  # the parent keeps only its reading end: EOF when the worker is gone
        self._recv = recv
        self._on_progress = on_progress
        self._outcome: tuple[Any, ...] | None = None
        self._reader = threading.Thread(target=self._read, name=f"{name} reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                message = self._recv.recv()
                if message[0] == "progress":
                    if self._on_progress is not None:
                        try:
                            self._on_progress(message[1])
                        except Exception:  # noqa: BLE001 - a progress line must not lose the result
                            log.exception("%s: progress handler failed", self.name)
                    continue
                self._outcome = message
                return
        except (EOFError, OSError) as exc:
            self._outcome = ("died", f"{type(exc).__name__}: {exc}")

    def result(self, timeout: float | None = None) -> Any:
        """The worker's return value; raises BackgroundError when it failed or died."""
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise TimeoutError(f"{self.name} still running after {timeout} s")
        self._process.join(timeout=30)
        outcome = self._outcome or ("died", "no message")
        if outcome[0] == "done":  # our own worker's bytes, written just now: not an untrusted file
            return torch.load(io.BytesIO(outcome[1]), weights_only=False)
        if outcome[0] == "error":
            raise BackgroundError(f"{self.name} failed: {outcome[1]}\n--- worker traceback ---\n{outcome[2]}")
        raise BackgroundError(f"{self.name}: the worker process exited with code {self._process.exitcode} "
                              f"before it returned a result (killed, or out of memory?); {outcome[-1]}")

    def cancel(self) -> None:
        """Stop the worker (a no-op when it has finished)."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=10)
        self._recv.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid


class _EpochReport(Callback):
    """Sends each epoch's logs to the parent: ("epoch", fit index, epoch, epochs, logs)."""

    def __init__(self, report: Report, fit: int) -> None:
        self.report, self.fit = report, fit

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, float]) -> None:
        self.report(("epoch", self.fit, epoch, trainer.epochs, dict(logs)))


def train_members_worker(build: Callable[[], nn.Module], train: TensorData, options: dict[str, Any], *,
                         report: Report) -> Members:
    """`train_members(build, train, None, **options)` in a worker, reporting every epoch; the
    networks come back on the CPU in eval mode."""
    members = train_members(build, train, None, callbacks=lambda i: [_EpochReport(report, i)], **options)
    members.networks = [net.cpu().eval() for net in members.networks]
    members.info["worker_pid"] = os.getpid()
    members.info["worker_threads"] = torch.get_num_threads()
    members.info["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return members
