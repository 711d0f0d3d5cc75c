"""A training in a spawned worker process beside the main one (`modeling.training.background`):
results, progress, the worker's errors and deaths, cancelling, and the thread split."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modeling.training import TensorData
from modeling.training.background import (
    BackgroundError,
    BackgroundFit,
    split_threads,
    train_members_worker,
)
from modeling.training.ensemble import train_members


def _sum_of_squares(x: torch.Tensor, *, report) -> dict:
    report(("step", 1))
    report(("step", 2))
    return {"sum": (x * x).sum(), "threads": torch.get_num_threads(), "pid": os.getpid()}


def _fails(*, report) -> None:
    raise ValueError("column Sales: not a number in row 7")


def _dies(*, report) -> None:
    report(("about to die",))
    os._exit(3)


def _sleeps(seconds: float, *, report) -> None:
    time.sleep(seconds)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1), torch.nn.Flatten(0))


def test_result_threads_and_progress_come_back():
    x = torch.arange(10_000, dtype=torch.float64)
    seen: list[tuple] = []
    fit = BackgroundFit(_sum_of_squares, (x,), threads=1, on_progress=seen.append)
    out = fit.result(timeout=120)
    assert out["sum"].item() == pytest.approx(float((x * x).sum()))
    assert out["threads"] == 1 and out["pid"] != os.getpid()
    assert seen == [("step", 1), ("step", 2)]


def test_an_error_in_the_worker_is_raised_here_with_its_traceback():
    fit = BackgroundFit(_fails, (), threads=1, name="refit worker")
    with pytest.raises(BackgroundError) as err:
        fit.result(timeout=120)
    text = str(err.value)
    assert "refit worker failed: ValueError: column Sales: not a number in row 7" in text
    assert "_fails" in text  # the worker's traceback names the function that raised


def test_a_worker_that_dies_is_an_error_not_an_empty_result():
    seen: list[tuple] = []
    fit = BackgroundFit(_dies, (), threads=1, on_progress=seen.append)
    with pytest.raises(BackgroundError, match="exited with code 3"):
        fit.result(timeout=120)
    assert seen == [("about to die",)]


def test_cancel_stops_a_running_worker():
    fit = BackgroundFit(_sleeps, (600.0,), threads=1)
    with pytest.raises(TimeoutError):
        fit.result(timeout=0.5)
    fit.cancel()
    with pytest.raises(BackgroundError, match="exited with code"):
        fit.result(timeout=30)


def test_split_threads():
    assert split_threads(1) is None and split_threads(0) is None
    assert split_threads(2) == (1, 1)
    assert split_threads(3) == (2, 1)
    assert split_threads(16) == (8, 8)


def test_members_trained_in_a_worker_equal_members_trained_here():
    """The same seeded snapshot ensemble, in a worker and in this process at the worker's thread
    count: the same weights, and every epoch reported as it ends."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, generator=g)
    data = TensorData((x,), x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(512, generator=g))
    options = dict(members=2, kind="snapshot", epochs=2, cycle_epochs=1, seed=5,
                   trainer_kwargs={"lr": 1e-2, "batch_size": 64, "quiet": True})
    seen: list[tuple] = []
    there = BackgroundFit(train_members_worker, (_net, data, options), threads=1, on_progress=seen.append).result(120)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = train_members(_net, data, None, **options)
    finally:
        torch.set_num_threads(threads)
    assert len(there.networks) == len(here.networks) == 2
    for a, b in zip(there.networks, here.networks, strict=True):
        for k, v in b.state_dict().items():
            torch.testing.assert_close(a.state_dict()[k], v, rtol=0, atol=0)
    assert [m[2] for m in seen] == [0, 1, 2] and all(m[0] == "epoch" and m[3] == 3 for m in seen)
    assert there.info["worker_threads"] == 1 and there.info["worker_pid"] != os.getpid()


def test_the_worker_ends_when_its_parent_is_killed():
    """A parent killed with SIGKILL runs no cleanup; its worker must not train on as an orphan."""
    script = (
        "import sys, time\n"
        "from modeling.training.background import BackgroundFit\n"
        "from tests.test_background import _sleeps\n"
        "fit = BackgroundFit(_sleeps, (600.0,), threads=1)\n"
        "print(fit.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
