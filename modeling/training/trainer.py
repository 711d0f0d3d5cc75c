"""Training loop: AdamW + lr/momentum schedule over in-memory tensors, with callbacks."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.training.callbacks import Callback, History, ProgressBar
from modeling.training.data import TensorData, batches
from modeling.training.optim import make_optimizer, model_groups, resolve_lrs
from modeling.training.schedules import Schedule, make_schedule

__all__ = ["Trainer", "fit", "mse", "resolve_device", "seed_torch"]

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
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
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
        seed_torch(self.seed, self.device)
        gen = torch.Generator().manual_seed(self.seed)
        train = train.to(self.device)
        valid = valid.to(self.device) if valid is not None else None
        n, bs = len(train), self.batch_size
        # A trailing 1-row batch breaks BatchNorm in train mode; drop it (it changes nothing else).
        drop_last = n > bs and n % bs == 1
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
        self._call("on_fit_begin")
        try:
            for epoch in range(epochs):
                self._call("on_epoch_begin", epoch)
                t0 = time.perf_counter()
                train_loss = self._train_epoch(train, gen, drop_last, batch_cbs)
                logs: dict[str, float] = {"epoch": epoch, "train_loss": train_loss}
                if valid is not None:
                    logs.update(self.evaluate(valid))
                logs["lr"] = float(self.opt.param_groups[-1]["lr"])
                logs["seconds"] = time.perf_counter() - t0
                self._call("on_epoch_end", epoch, logs)
                if self.stop_training:
                    break
        finally:
            self._call("on_fit_end")
        return self.history

    def _train_epoch(
        self, data: TensorData, gen: torch.Generator, drop_last: bool, batch_cbs: list[Callback]
    ) -> float:
        assert self.opt is not None
        model, opt, loss_fn, xs, y = self.model, self.opt, self.loss_fn, data.xs, data.y
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        rows = 0
        params = [p for g in opt.param_groups for p in g["params"]]
        for idx in batches(len(data), self.batch_size, gen, True, self.device, drop_last):
            self._apply_schedule(self.step)
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
            if self.stop_training:
                break
        return float(loss_sum) / max(rows, 1)

    # ------------------------------------------------------------------ inference
    def _predict_device(self, xs: Sequence[Tensor], batch_size: int | None = None) -> Tensor:
        """Predictions for all rows, concatenated on the trainer's device (eval mode, no grad)."""
        bs = batch_size or max(self.batch_size, 4096)
        n = xs[0].shape[0]
        self.model.eval()
        outs = []
        with torch.no_grad(), self._autocast():
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
        """valid_loss and each metric over the whole set (metric fns get full pred/target tensors)."""
        pred = self._predict_device(data.xs)
        y = data.y.to(self.device)
        logs = {"valid_loss": float(self.loss_fn(pred, y))}
        for name, fn in self.metrics.items():
            logs[name] = float(fn(pred, y))
        return logs


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
