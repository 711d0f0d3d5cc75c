"""Learning-rate / momentum schedules as pure functions of the step, so they can be unit-tested."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Schedule", "constant", "cycle_ends", "make_schedule", "one_cycle", "restarts", "sgdr", "SCHEDULES"]

LR = float | Sequence[float]


def _cos_interp(start: float, end: float, frac: float) -> float:
    """Half-cosine from `start` (frac=0) to `end` (frac=1)."""
    frac = min(max(frac, 0.0), 1.0)
    return end + (start - end) * (1.0 + math.cos(math.pi * frac)) / 2.0


def _scale(lr_max: LR, fn: Callable[[float], float]) -> float | list[float]:
    """Apply `fn` to one lr or to each per-group lr."""
    if isinstance(lr_max, int | float):
        return fn(float(lr_max))
    return [fn(float(v)) for v in lr_max]


def one_cycle(
    step: int,
    total_steps: int,
    lr_max: LR,
    pct_start: float = 0.25,
    div: float = 25.0,
    div_final: float = 1e5,
    moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
) -> tuple[float | list[float], float]:
    """(lr, momentum) at `step` of a one-cycle policy.

    lr warms up along a half cosine from lr_max/div to lr_max over the first `pct_start` of the
    steps, then anneals to lr_max/div_final at the last step (step = total_steps - 1). Momentum
    (AdamW beta1) moves the opposite way: moms[0] -> moms[1] -> moms[2], so the optimizer damps
    less while the lr is high.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= pct_start <= 1.0:
        raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
    progress = step / max(total_steps - 1, 1)
    if progress < pct_start:
        frac = progress / pct_start
        lr = _scale(lr_max, lambda v: _cos_interp(v / div, v, frac))
        return lr, _cos_interp(moms[0], moms[1], frac)
    frac = (progress - pct_start) / (1.0 - pct_start) if pct_start < 1.0 else 1.0
    lr = _scale(lr_max, lambda v: _cos_interp(v, v / div_final, frac))
    return lr, _cos_interp(moms[1], moms[2], frac)


def sgdr(
    step: int,
    steps_per_epoch: int,
    lr_max: LR,
    cycle_len: float = 1,
    cycle_mult: float = 2,
    lr_min: float = 0.0,
) -> float | list[float]:
    """Cosine annealing with warm restarts: cycle i lasts cycle_len * cycle_mult**i epochs.

    Each cycle starts at lr_max and cosine-anneals towards lr_min; the lr jumps back to lr_max at
    every cycle boundary.
    """
    if steps_per_epoch < 1 or cycle_len <= 0 or cycle_mult <= 0:
        raise ValueError("sgdr needs steps_per_epoch >= 1, cycle_len > 0 and cycle_mult > 0")
    cycle_steps = cycle_len * steps_per_epoch
    pos = float(step)
    while pos >= cycle_steps:
        pos -= cycle_steps
        cycle_steps *= cycle_mult
    frac = pos / cycle_steps
    return _scale(lr_max, lambda v: lr_min + (v - lr_min) * (1.0 + math.cos(math.pi * frac)) / 2.0)


def cycle_ends(cycles: Sequence[int]) -> list[int]:
    """Epoch counts at which each cycle of `restarts` ends ([3, 1, 1] -> [3, 4, 5])."""
    ends, total = [], 0
    for c in cycles:
        total += int(c)
        ends.append(total)
    return ends


def restarts(
    step: int,
    steps_per_epoch: int,
    lr_max: LR,
    cycles: Sequence[int] = (1,),
    pct_start: float = 0.25,
    restart_pct_start: float | None = None,
    div: float = 25.0,
    div_final: float = 1e5,
    moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
) -> tuple[float | list[float], float]:
    """One-cycle with warm restarts: cycle i is a `one_cycle` over `cycles[i]` whole epochs.

    Each cycle ends annealed (lr_max/div_final), so the weights at a cycle's end are a finished
    model: a snapshot ensemble averages them. The first cycle is exactly `one_cycle` over
    cycles[0] epochs (a one-member run equals a plain one-cycle run); later cycles warm up over
    `restart_pct_start` of their steps (default: pct_start). Past the last cycle the lr stays at
    the final value.
    """
    if steps_per_epoch < 1 or not cycles or min(cycles) < 1:
        raise ValueError(f"restarts needs steps_per_epoch >= 1 and cycles of >= 1 epoch, got {list(cycles)}")
    pos = step
    for i, c in enumerate(cycles):
        n = int(c) * steps_per_epoch
        if pos < n or i == len(cycles) - 1:
            pct = pct_start if i == 0 or restart_pct_start is None else restart_pct_start
            return one_cycle(min(pos, n - 1), n, lr_max, pct_start=pct, div=div, div_final=div_final, moms=moms)
        pos -= n
    raise AssertionError("unreachable")


def constant(step: int, lr_max: LR) -> float | list[float]:
    """The same lr at every step."""
    return _scale(lr_max, lambda v: v)


@dataclass(frozen=True)
class Schedule:
    """A schedule bound to a run: `schedule(step) -> (per-group lrs, beta1 or None to keep it)`."""

    name: str
    lr_max: tuple[float, ...]
    fn: Callable[[int], tuple[float | list[float], float | None]]

    def __call__(self, step: int) -> tuple[list[float], float | None]:
        lr, mom = self.fn(step)
        lrs = [lr] if isinstance(lr, float) else list(lr)
        return lrs, mom


def make_schedule(
    name: str,
    *,
    lr_max: LR,
    total_steps: int,
    steps_per_epoch: int | None = None,
    **kwargs: Any,
) -> Schedule:
    """Bind a named schedule ("one_cycle" | "sgdr" | "restarts" | "constant") to one run's lrs and length."""
    lrs = (float(lr_max),) if isinstance(lr_max, int | float) else tuple(float(v) for v in lr_max)
    lr_arg = list(lrs)
    spe = steps_per_epoch or total_steps
    if name == "one_cycle":
        _ = one_cycle(0, total_steps, lr_arg, **kwargs)  # validate kwargs eagerly

        def fn(step: int) -> tuple[float | list[float], float | None]:
            return one_cycle(step, total_steps, lr_arg, **kwargs)
    elif name == "sgdr":
        _ = sgdr(0, spe, lr_arg, **kwargs)

        def fn(step: int) -> tuple[float | list[float], float | None]:
            return sgdr(step, spe, lr_arg, **kwargs), None
    elif name == "restarts":
        _ = restarts(0, spe, lr_arg, **kwargs)

        def fn(step: int) -> tuple[float | list[float], float | None]:
            return restarts(step, spe, lr_arg, **kwargs)
    elif name == "constant":
        if kwargs:
            raise TypeError(f"constant schedule takes no options, got {sorted(kwargs)}")

        def fn(step: int) -> tuple[float | list[float], float | None]:
            return constant(step, lr_arg), None
    else:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    return Schedule(name=name, lr_max=lrs, fn=fn)


SCHEDULES = ("one_cycle", "sgdr", "restarts", "constant")
