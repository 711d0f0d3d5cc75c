"""Learning-rate range test: an exponential lr sweep on a throwaway copy of the model."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from modeling.training.callbacks import ProgressBar
from modeling.training.data import TensorData, batches
from modeling.training.optim import make_optimizer
from modeling.training.trainer import mse, resolve_device, seed_torch

__all__ = ["LRFinderResult", "lr_find", "suggest_lr"]


@dataclass
class LRFinderResult:
    """Swept lrs, smoothed losses, the suggested lr and which rule chose it ("valley" | "steepest")."""

    lrs: list[float]
    losses: list[float]
    suggestion: float
    method: str

    def to_dict(self) -> dict[str, object]:
        return {
            "lrs": self.lrs,
            "losses": self.losses,
            "suggestion": self.suggestion,
            "method": self.method,
        }

    def plot(self, path: str | Path) -> Path:
        """Save loss vs lr (log x) with the suggestion marked, as a PNG; returns the path."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("smoothed training loss")
        if self.lrs:
            y = float(np.interp(math.log(self.suggestion), np.log(self.lrs), self.losses))
            ax.plot([self.suggestion], [y], "ro")
            ax.axvline(self.suggestion, color="r", linestyle=":", linewidth=1)
        ax.set_title(f"lr finder: suggestion {self.suggestion:.2e} ({self.method})")
        fig.tight_layout()
        fig.savefig(path, format="png")
        return path


def _longest_descent(losses: np.ndarray) -> np.ndarray:
    """Indices of the longest strictly decreasing subsequence of `losses` (O(n^2), n is small)."""
    n = losses.size
    length = np.ones(n, dtype=np.int64)
    parent = np.full(n, -1, dtype=np.int64)
    for j in range(1, n):
        earlier = np.flatnonzero(losses[:j] > losses[j])
        if earlier.size:
            best = earlier[np.argmax(length[earlier])]
            length[j], parent[j] = length[best] + 1, best
    members = [int(np.argmax(length))]
    while parent[members[-1]] >= 0:
        members.append(int(parent[members[-1]]))
    return np.asarray(members[::-1], dtype=np.int64)


def suggest_lr(lrs: list[float], losses: list[float]) -> tuple[float, str]:
    """Pick an lr from a sweep: the "valley" rule, falling back to the steepest descent.

    Valley: up to the lowest loss, take the longest (not necessarily contiguous) strictly
    decreasing run of the smoothed losses, the stretch where raising the lr keeps helping. Drop
    its head while the loss is still on the initial plateau (above plateau - 10% of the total
    drop, plateau = 90th percentile of those losses), then return the point two thirds of the way
    along what remains, counted in sweep steps (= log lr): well past where the loss starts to fall,
    safely before the bottom where training turns unstable. If that stretch has fewer than 3
    points or covers under 5% of the sweep (noisy or flat curve), fall back to the point where
    the loss falls fastest per unit log(lr) ("steepest").
    """
    lr = np.asarray(lrs, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if lr.size == 0:
        raise ValueError("lr sweep is empty")
    if lr.size < 3:
        return float(lr[int(np.argmin(loss))]), "min"
    prefix = loss[: int(np.argmin(loss)) + 1]
    members = _longest_descent(prefix)
    plateau = float(np.percentile(prefix, 90))
    members = members[loss[members] <= plateau - 0.1 * (plateau - prefix[-1])]
    if members.size >= max(3, int(0.05 * lr.size)):
        first, last = int(members[0]), int(members[-1])
        return float(lr[first + round((last - first) * 2 / 3)]), "valley"
    grads = np.gradient(loss, np.log(lr))
    return float(lr[int(np.argmin(grads[1:-1])) + 1]), "steepest"


def lr_find(
    model: nn.Module,
    train: TensorData,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = mse,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    batch_size: int = 1024,
    wd: float = 0.01,
    seed: int = 0,
    device: str | torch.device = "auto",
    smooth: float = 0.98,
    diverge: float = 4.0,
    quiet: bool = False,
) -> LRFinderResult:
    """Train a deepcopy of `model` while raising the lr exponentially from start_lr to end_lr.

    One lr per step for `num_it` steps (cycling through seeded shuffled batches); the recorded loss
    is a bias-corrected exponential moving average (`smooth`), and the sweep stops early once it
    exceeds `diverge` times the best seen or becomes non-finite. `model` itself is not modified.
    See `suggest_lr` for how the suggestion is chosen.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    if num_it < 2:
        raise ValueError(f"num_it must be >= 2, got {num_it}")
    if len(train) == 0:
        raise ValueError("lr_find: training set is empty")
    dev = resolve_device(device)
    seed_torch(seed, dev)
    gen = torch.Generator().manual_seed(seed)
    work = copy.deepcopy(model).to(dev)
    work.train()
    data = train.to(dev)
    opt = make_optimizer(work, start_lr, wd=wd)
    ratio = (end_lr / start_lr) ** (1.0 / (num_it - 1))
    drop_last = len(data) > batch_size and len(data) % batch_size == 1
    bar = ProgressBar(quiet=quiet)
    progress = None
    if bar.enabled:
        from tqdm.auto import tqdm

        progress = tqdm(total=num_it, desc="lr_find", leave=False)

    lrs: list[float] = []
    smoothed: list[float] = []
    avg, best = 0.0, math.inf
    it = 0
    try:
        while it < num_it:
            for idx in batches(len(data), batch_size, gen, True, dev, drop_last):
                lr = start_lr * ratio**it
                for group in opt.param_groups:
                    group["lr"] = lr
                loss = loss_fn(work(*(x[idx] for x in data.xs)).float(), data.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = float(loss.detach())
                avg = smooth * avg + (1 - smooth) * value
                s = avg / (1 - smooth ** (it + 1))
                it += 1
                if progress is not None:
                    progress.update(1)
                if not math.isfinite(s):
                    break
                lrs.append(lr)
                smoothed.append(s)
                best = min(best, s)
                if s > diverge * best or it >= num_it:
                    break
            else:
                continue
            break
    finally:
        if progress is not None:
            progress.close()
    if not lrs:
        raise ValueError("lr_find: the loss was not finite at the first step")
    suggestion, method = suggest_lr(lrs, smoothed)
    return LRFinderResult(lrs=lrs, losses=smoothed, suggestion=suggestion, method=method)
