"""Data-parallel training with torch.distributed: process-group lifecycle, rank info, sharding.

Workers are started by `torchrun` (or `tabrec train ... --nproc N`, which runs the same launcher),
which sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
`process_group()` turns that environment into an initialized process group (gloo on CPU, NCCL
on CUDA) for the duration of a block; inside it `Trainer.fit` wraps the model in
DistributedDataParallel and trains each rank on its shard of every global batch
(`sharded_batches`). Outside torchrun everything here is a no-op and training is the plain
single-process loop.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "Terminated",
    "broadcast_object",
    "convert_sync_batchnorm",
    "current",
    "in_torchrun_worker",
    "process_group",
    "revert_sync_batchnorm",
    "shard",
    "sharded_batches",
    "sharded_steps",
    "threads_per_rank",
]

log = logging.getLogger("tabrec.distributed")

_ENV = ("RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank 0 of 1 outside torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs to MLflow, runs checks and saves the bundle."""
        return self.rank == 0


class Terminated(RuntimeError):
    """Raised in a worker on SIGTERM (torchrun stops the other ranks when one fails), so that
    context managers such as `tracking.tracked_run` still close their state (run -> FAILED)."""


def in_torchrun_worker() -> bool:
    """True in a process started by torchrun (RANK and WORLD_SIZE in the environment)."""
    return all(k in os.environ for k in _ENV)


def current() -> DistInfo:
    """Rank and world size of the initialized process group, else the single-process default.

    Refuses to guess under torchrun with WORLD_SIZE > 1 but no process group: every rank would
    otherwise believe it is rank 0 (and, e.g., create its own MLflow run).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)
    if in_torchrun_worker() and int(os.environ["WORLD_SIZE"]) > 1:
        raise RuntimeError(
            f"running as rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} under torchrun but no "
            "process group is initialized: run training inside "
            "modeling.training.distributed.process_group()"
        )
    return DistInfo()


def threads_per_rank(local_world_size: int) -> int:
    """Torch intra-op threads for each of `local_world_size` processes sharing this machine's cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"received signal {signum} (another rank failed or the job was stopped)")


@contextlib.contextmanager
def process_group(backend: str = "auto", timeout_minutes: float = 30.0) -> Iterator[DistInfo]:
    """Initialize torch.distributed from the torchrun environment for the block; destroy it after.

    backend "auto" is NCCL when CUDA is available (each rank on cuda:LOCAL_RANK) and gloo
    otherwise; the TABREC_DIST_BACKEND environment variable overrides it. Sets torch's intra-op
    threads to cores // LOCAL_WORLD_SIZE and turns SIGTERM into a `Terminated` exception. Outside
    torchrun, or when a process group already exists, it only yields `current()`.
    """
    if not in_torchrun_worker() or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    torch.set_num_threads(threads_per_rank(local_world))
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = os.environ.get("TABREC_DIST_BACKEND") or ("nccl" if use_cuda else "gloo")
    kwargs: dict[str, Any] = {}
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible, "
                f"{local_world} processes on this node (use --nproc <= the number of GPUs)"
            )
        torch.cuda.set_device(local_rank)
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    log.info("rank %d/%d (local %d) joined the %s process group, %d torch threads", rank, world,
             local_rank, backend, torch.get_num_threads())
    try:
        yield current()
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it (picklable), on every rank; the identity outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------- sharding
def shard(rows: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank `rank`'s contiguous 1/world_size of `rows`: len(rows) // world_size rows each, so every
    rank gets the same count; the len(rows) % world_size trailing rows go to no rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    k = rows.shape[0] // world_size
    return rows[rank * k : (rank + 1) * k]


def _plan(n: int, batch_size: int, world_size: int) -> tuple[int, int, bool]:
    """(rows of one global batch, full global batches, whether the trailing partial one is kept)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if batch_size < world_size:
        raise ValueError(f"batch size {batch_size} is smaller than the {world_size} processes")
    global_bs = (batch_size // world_size) * world_size
    full, rest = divmod(n, global_bs)
    # Every rank needs >= 2 rows of the trailing batch (BatchNorm in train mode), else it is dropped.
    return global_bs, full, rest // world_size >= 2


def sharded_steps(n: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch of `sharded_batches` (the same on every rank)."""
    _, full, keep_last = _plan(n, batch_size, world_size)
    return full + int(keep_last)


def sharded_batches(
    n: int,
    batch_size: int,
    rank: int,
    world_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Iterator[Tensor]:
    """This rank's share of each global batch of one seeded permutation of range(n).

    Every rank draws the same permutation (same generator state) and cuts it into global batches
    of `batch_size` rows (rounded down to a multiple of world_size) exactly as the single-process
    loop does; rank r takes the r-th contiguous 1/world_size of each (`shard`). So the union over
    ranks of step k is the single-process batch k, all ranks run the same number of equally sized
    steps (unequal step counts would deadlock DDP), and shards are disjoint. A trailing batch
    that would leave a rank fewer than 2 rows is dropped (< 2 * world_size rows per epoch).
    """
    global_bs, full, keep_last = _plan(n, batch_size, world_size)
    order = torch.randperm(n, generator=generator)
    if device is not None:
        order = order.to(device)
    stop = full * global_bs + (n - full * global_bs if keep_last else 0)
    for start in range(0, stop, global_bs):
        yield shard(order[start : start + global_bs], rank, world_size)


# --------------------------------------------------------------------------- SyncBatchNorm
def convert_sync_batchnorm(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Swap BatchNorm layers for SyncBatchNorm in place (CUDA only in torch); returns what
    `revert_sync_batchnorm` needs. The parameters and buffers stay the same tensor objects."""
    originals = {
        name: type(m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
    }
    if not originals or "" in originals:  # a bare BatchNorm model cannot be swapped in place
        return {}
    for name in originals:
        _swap(model, name, nn.SyncBatchNorm.convert_sync_batchnorm)
    return originals


def revert_sync_batchnorm(model: nn.Module, originals: dict[str, type[nn.Module]]) -> None:
    """Undo `convert_sync_batchnorm`: the original BatchNorm classes, same parameters and buffers."""
    for name, cls in originals.items():
        _swap(model, name, lambda m, cls=cls: _plain_bn(m, cls))


def _swap(model: nn.Module, name: str, make: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, make(getattr(parent, child)))


def _plain_bn(sync: nn.Module, cls: type[nn.Module]) -> nn.Module:
    bn = cls(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats)
    if sync.affine:
        bn.weight, bn.bias = sync.weight, sync.bias
    if sync.track_running_stats:
        bn.running_mean, bn.running_var = sync.running_mean, sync.running_var
        bn.num_batches_tracked = sync.num_batches_tracked
    bn.train(sync.training)
    return bn
