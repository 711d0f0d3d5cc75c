"""Training loop: AdamW + lr/momentum schedule over in-memory tensors, with callbacks."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.training import distributed
from modeling.training.callbacks import Callback, History, ProgressBar
from modeling.training.data import TensorData, batches
from modeling.training.objectives import Objective
from modeling.training.optim import make_optimizer, model_groups, resolve_lrs
from modeling.training.schedules import Schedule, make_schedule

__all__ = ["PRECISIONS", "Trainer", "bf16_is_fast", "fit", "mse", "resolve_device", "resolve_precision", "seed_torch"]

Metric = Callable[[Tensor, Tensor], float]


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error; refuses shape mismatches that would silently broadcast."""
    if pred.shape != target.shape:
        raise ValueError(
            f"model output shape {tuple(pred.shape)} != target shape {tuple(target.shape)}; "
            "single-output models must return a 1-D tensor"
        )
    return F.mse_loss(pred, target)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve "auto" to cuda when available, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


PRECISIONS = ("auto", "fp32", "bf16")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: a CUDA GPU with bf16 support, or a CPU with AMX
    tiles or AVX512-BF16 (elsewhere oneDNN emulates bf16 and it is slower than fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def resolve_precision(precision: str, device: str | torch.device = "auto") -> str:
    """'auto' -> 'bf16' where `bf16_is_fast`, else 'fp32'; 'fp32' and 'bf16' stay as asked."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if bf16_is_fast(resolve_device(device)) else "fp32"


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed the generators training draws from (CPU, plus CUDA when used); cheaper than manual_seed."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


class Trainer:
    """Fits a model on TensorData with AdamW, a schedule, optional grad clipping and bf16 autocast.

    `lr` is one float, one lr per model param group, or a (low, high) tuple spread geometrically
    over the groups; the schedule scales every group's lr by the same factor. `seed` seeds the
    torch generators and the batch permutation at each fit, so CPU runs are reproducible.
    Per-batch work is kept to the minimum a hand-written loop does: the training loss is summed
    on the device (one sync per epoch), and on_batch_end callbacks only run when overridden.

    Inside an initialized torch.distributed process group (see `modeling.training.distributed`)
    `fit` trains with DistributedDataParallel: `batch_size` stays the global batch, each rank
    takes its 1/world_size of every global batch of the same seeded permutation, gradients are
    averaged, BatchNorm becomes SyncBatchNorm on CUDA (per-rank statistics on CPU), validation
    runs on rank 0 and its logs are broadcast so callbacks (early stopping) decide identically,
    a stop request takes effect at the end of an epoch, and after fit every rank holds rank 0's
    weights. Outside a process group nothing of this runs.

    `objective` (a `modeling.training.objectives.Objective`) replaces `loss_fn(model(*xs), y)`
    for losses that need the model and the batch (ranking losses with negatives); it is seeded
    from `seed` (+ rank) at each fit. With one, `evaluate` reports only valid_loss (the
    objective on the validation rows), and `metrics` are not computed.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = mse,
        metrics: dict[str, Metric] | None = None,
        lr: float | Sequence[float] = 1e-3,
        wd: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.99),
        schedule: str = "one_cycle",
        schedule_kwargs: dict[str, Any] | None = None,
        batch_size: int = 1024,
        device: str | torch.device = "auto",
        seed: int = 0,
        grad_clip: float | None = None,
        mixed_precision: bool = False,
        callbacks: list[Callback] | None = None,
        quiet: bool = False,
        objective: Objective | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.objective = objective
        self.metrics = dict(metrics or {})
        self.lr, self.wd, self.betas = lr, wd, betas
        self.schedule_name = schedule
        self.schedule_kwargs = dict(schedule_kwargs or {})
        self.batch_size = batch_size
        self.seed = seed
        self.grad_clip = grad_clip
        self.mixed_precision = mixed_precision
        self.quiet = quiet
        self.callbacks: list[Callback] = list(callbacks or [])
        if not any(isinstance(cb, History) for cb in self.callbacks):
            self.callbacks.insert(0, History())
        if not any(isinstance(cb, ProgressBar) for cb in self.callbacks):
            self.callbacks.append(ProgressBar(quiet=quiet))
        self.history: History = next(cb for cb in self.callbacks if isinstance(cb, History))
        self.opt: torch.optim.Optimizer | None = None
        self.schedule: Schedule | None = None
        self.stop_training = False
        self.total_steps = 0
        self.epochs = 0
        self.step = 0
        self._ddp: nn.Module | None = None

    # ------------------------------------------------------------------ helpers
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _apply_schedule(self, step: int) -> None:
        assert self.opt is not None and self.schedule is not None
        lrs, mom = self.schedule(step)
        for group in self.opt.param_groups:
            group["lr"] = lrs[group["model_group"]]
            if mom is not None:
                group["betas"] = (mom, group["betas"][1])

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # ------------------------------------------------------------------ training
    def fit(self, train: TensorData, valid: TensorData | None = None, epochs: int = 5) -> History:
        """Train for `epochs` (fresh optimizer and schedule), validating on the whole `valid` set."""
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if len(train) < 2:
            raise ValueError(f"training set has {len(train)} rows; need at least 2")
        world = distributed.current()
        # Same batch permutation on every rank; dropout etc. draw from a per-rank stream.
        seed_torch(self.seed + world.rank, self.device)
        gen = torch.Generator().manual_seed(self.seed)
        if self.objective is not None:
            self.objective.start(self.seed + world.rank, self.device)
        train = train.to(self.device)
        valid = valid.to(self.device) if valid is not None else None
        n, bs = len(train), self.batch_size
        # A trailing 1-row batch breaks BatchNorm in train mode; drop it (it changes nothing else).
        drop_last = n > bs and n % bs == 1
        if world.initialized:
            steps_per_epoch = distributed.sharded_steps(n, bs, world.world_size)
            if steps_per_epoch == 0:
                raise ValueError(f"training set has {n} rows; too few for {world.world_size} processes")
        else:
            steps_per_epoch = n // bs if drop_last else math.ceil(n / bs)
        self.total_steps = steps_per_epoch * epochs
        self.epochs = epochs
        self.opt = make_optimizer(self.model, self.lr, wd=self.wd, betas=self.betas)
        lr_max = resolve_lrs(self.lr, len(model_groups(self.model)))
        self.schedule = make_schedule(
            self.schedule_name,
            lr_max=lr_max,
            total_steps=self.total_steps,
            steps_per_epoch=steps_per_epoch,
            **self.schedule_kwargs,
        )
        batch_cbs = [cb for cb in self.callbacks if cb.wants_batch_end]
        self.stop_training = False
        self.step = 0
        sync_bn: dict[str, type[nn.Module]] = {}
        if world.initialized:
            if self.device.type == "cuda":
                sync_bn = distributed.convert_sync_batchnorm(self.model)
            device_ids = [self.device.index or torch.cuda.current_device()] if self.device.type == "cuda" else None
            self._ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self._call("on_fit_begin")
        try:
            for epoch in range(epochs):
                self._call("on_epoch_begin", epoch)
                t0 = time.perf_counter()
                if world.initialized:
                    order = distributed.sharded_batches(n, bs, world.rank, world.world_size, gen, self.device)
                else:
                    order = batches(n, bs, gen, True, self.device, drop_last)
                train_loss = self._train_epoch(train, order, batch_cbs)
                logs: dict[str, float] = {"epoch": epoch, "train_loss": train_loss}
                if valid is not None:
                    if world.initialized:
                        logs.update(distributed.broadcast_object(self.evaluate(valid) if world.is_main else None))
                    else:
                        logs.update(self.evaluate(valid))
                logs["lr"] = float(self.opt.param_groups[-1]["lr"])
                logs["seconds"] = time.perf_counter() - t0
                self._call("on_epoch_end", epoch, logs)
                if world.initialized:  # rank 0 decides, so no rank trains on alone (deadlock)
                    self.stop_training = bool(distributed.broadcast_object(self.stop_training))
                if self.stop_training:
                    break
        finally:
            self._call("on_fit_end")
            self._ddp = None
            distributed.revert_sync_batchnorm(self.model, sync_bn)
        if world.initialized:  # e.g. BatchNorm running stats differ per rank: keep rank 0's
            for t in self.model.state_dict().values():
                dist.broadcast(t, src=0)
        return self.history

    def _train_epoch(self, data: TensorData, order: Iterator[Tensor], batch_cbs: list[Callback]) -> float:
        """One pass over the index batches of `order`; returns the mean training loss (over all ranks)."""
        assert self.opt is not None
        model = self._ddp if self._ddp is not None else self.model
        opt, loss_fn, objective, xs, y = self.opt, self.loss_fn, self.objective, data.xs, data.y
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        rows = 0
        params = [p for g in opt.param_groups for p in g["params"]]
        for idx in order:
            self._apply_schedule(self.step)
            if objective is not None:
                with self._autocast():
                    loss = objective(model, tuple(x[idx] for x in xs), y[idx])
            else:
                with self._autocast():
                    out = model(*(x[idx] for x in xs))
                loss = loss_fn(out.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, self.grad_clip)
            opt.step()
            n_b = idx.shape[0]
            loss_sum.add_(loss.detach(), alpha=n_b)
            rows += n_b
            for cb in batch_cbs:
                if (self.step + 1) % cb.batch_end_every == 0:
                    cb.on_batch_end(self, self.step, float(loss.detach()))
            self.step += 1
            if self.stop_training and self._ddp is None:  # under DDP only at the epoch end
                break
        if self._ddp is not None:
            total = torch.stack([loss_sum, torch.tensor(float(rows), device=self.device)])
            dist.all_reduce(total)
            loss_sum, rows = total[0], int(total[1])
        return float(loss_sum) / max(rows, 1)

    # ------------------------------------------------------------------ inference
    def _predict_device(self, xs: Sequence[Tensor], batch_size: int | None = None) -> Tensor:
        """Predictions for all rows, concatenated on the trainer's device (eval mode, no grad). In
        float32 even when training runs in bf16: per-epoch metrics are then those of the weights as
        the logged model serves them."""
        bs = batch_size or max(self.batch_size, 4096)
        n = xs[0].shape[0]
        self.model.eval()
        outs = []
        with torch.no_grad():
            for start in range(0, n, bs):
                batch = (x[start : start + bs].to(self.device, non_blocking=True) for x in xs)
                outs.append(self.model(*batch).float())
        if not outs:
            return torch.empty(0, device=self.device)
        return torch.cat(outs)

    def predict(self, xs: Sequence[Tensor], batch_size: int | None = None) -> Tensor:
        """Model outputs for every row of `xs`, as a CPU tensor."""
        return self._predict_device(tuple(xs), batch_size).cpu()

    def evaluate(self, data: TensorData) -> dict[str, float]:
        """valid_loss and each metric over the whole set (metric fns get full pred/target tensors).

        With an objective: valid_loss only, the row-weighted mean of the objective over batches."""
        if self.objective is not None:
            return {"valid_loss": self._objective_loss(data.to(self.device))}
        pred = self._predict_device(data.xs)
        y = data.y.to(self.device)
        logs = {"valid_loss": float(self.loss_fn(pred, y))}
        for name, fn in self.metrics.items():
            logs[name] = float(fn(pred, y))
        return logs

    def _objective_loss(self, data: TensorData) -> float:
        assert self.objective is not None
        bs, n, total = max(self.batch_size, 1), len(data), 0.0
        self.model.eval()
        with torch.no_grad(), self._autocast():
            for start in range(0, n, bs):
                part = data.subset(slice(start, start + bs))
                total += float(self.objective(self.model, part.xs, part.y)) * len(part)
        return total / max(n, 1)


def fit(
    model: nn.Module,
    train: TensorData,
    valid: TensorData | None = None,
    epochs: int = 5,
    **trainer_kwargs: Any,
) -> tuple[Trainer, History]:
    """Functional shortcut: build a Trainer(model, **trainer_kwargs) and fit it."""
    trainer = Trainer(model, **trainer_kwargs)
    history = trainer.fit(train, valid, epochs=epochs)
    return trainer, history
