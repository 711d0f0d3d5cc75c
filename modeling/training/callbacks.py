"""Training callbacks: hooks the Trainer calls around epochs and batches."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from modeling.training.trainer import Trainer

__all__ = ["Callback", "EarlyStopping", "History", "ProgressBar", "Snapshots"]


class Callback:
    """Base class; override any hook. Set `trainer.stop_training = True` to stop after this epoch.

    on_batch_end is called every `batch_end_every` steps, and only for callbacks that override it.
    """

    batch_end_every: int = 1

    def on_fit_begin(self, trainer: Trainer) -> None:
        pass

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        pass

    def on_batch_end(self, trainer: Trainer, step: int, loss: float) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass

    @property
    def wants_batch_end(self) -> bool:
        """Whether the trainer must call on_batch_end (it costs a device sync per batch on GPU)."""
        return type(self).on_batch_end is not Callback.on_batch_end


class History(Callback):
    """Per-epoch log dicts of the latest fit (keys: epoch, train_loss, valid_loss, metrics, lr, seconds)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_fit_begin(self, trainer: Trainer) -> None:
        self.epochs = []

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        self.epochs.append(dict(logs))

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, i: int) -> dict[str, float]:
        return self.epochs[i]

    def __iter__(self) -> Iterator[dict[str, float]]:
        return iter(self.epochs)

    def series(self, key: str) -> list[float]:
        """One log key across epochs (e.g. "valid_loss")."""
        return [e[key] for e in self.epochs]

    @property
    def last(self) -> dict[str, float]:
        return self.epochs[-1] if self.epochs else {}


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved for `patience` epochs; optionally restore the best weights."""

    def __init__(
        self,
        monitor: str = "valid_loss",
        mode: str = "min",
        patience: int = 3,
        restore_best: bool = True,
        min_delta: float = 0.0,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.restore_best, self.min_delta = restore_best, min_delta
        self._reset()

    def _reset(self) -> None:
        self.best: float = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_fit_begin(self, trainer: Trainer) -> None:
        self._reset()

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        if self.monitor not in logs:
            raise KeyError(
                f"EarlyStopping monitors {self.monitor!r} but the epoch logs only have "
                f"{sorted(logs)} (is a validation set given?)"
            )
        value = float(logs[self.monitor])
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self._best_state = {
                    k: v.detach().clone() for k, v in trainer.model.state_dict().items()
                }
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            trainer.stop_training = True

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.restore_best and self._best_state is not None:
            trainer.model.load_state_dict(self._best_state)


class Snapshots(Callback):
    """Copies of the model's weights at the end of chosen epochs (1-based epoch counts, e.g. the
    cycle ends of a `restarts` schedule): the members of a snapshot ensemble. Nothing is chosen
    by a metric: every listed epoch is kept, in order, on the CPU."""

    def __init__(self, at_epochs: list[int] | tuple[int, ...]) -> None:
        self.at_epochs = sorted({int(e) for e in at_epochs})
        self.states: list[dict[str, torch.Tensor]] = []
        self.epochs: list[int] = []

    def on_fit_begin(self, trainer: Trainer) -> None:
        self.states, self.epochs = [], []

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        if epoch + 1 in self.at_epochs:
            self.states.append({k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()})
            self.epochs.append(epoch + 1)


class ProgressBar(Callback):
    """tqdm bar over all training steps on stderr when it is a TTY; otherwise (unless quiet)
    one log line per epoch, so long runs in CI or cron still show progress."""

    def __init__(self, quiet: bool = False, update_every: int = 20) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self.log_epochs = not quiet and not self.enabled
        self.batch_end_every = max(1, update_every)
        self._bar: Any = None

    @property
    def wants_batch_end(self) -> bool:
        return self.enabled

    def on_fit_begin(self, trainer: Trainer) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=trainer.total_steps, file=sys.stderr, unit="batch", leave=False)

    def on_batch_end(self, trainer: Trainer, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(step + 1 - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        if self._bar is not None:
            parts = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()
            )
            self._bar.write(parts, file=sys.stderr)
        elif self.log_epochs:
            parts = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()
            )
            logging.getLogger("tabrec.train").info(
                "epoch %s/%s %s", epoch + 1, trainer.epochs, parts
            )

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
