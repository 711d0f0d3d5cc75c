"""Ensembles of one network architecture: members from different seeds, or snapshots taken at the
ends of the cycles of one run with warm restarts. Predictions average the members' outputs on the
model's own scale (for a log target: in log space, i.e. a geometric mean of the answers).

`train_members` is what a training job calls for its validation run and, with the same settings,
for a refit on all rows; nothing in it looks at the validation rows to choose anything (every
member is kept, each at the end of its schedule).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from modeling.training.callbacks import Callback, History, Snapshots
from modeling.training.data import TensorData
from modeling.training.schedules import cycle_ends
from modeling.training.trainer import Trainer

__all__ = ["ENSEMBLE_KINDS", "Members", "predict_mean", "snapshot_cycles", "train_members"]

ENSEMBLE_KINDS = ("snapshot", "seeds")


@dataclass
class Members:
    """Trained networks (the first is the one a single-model run would give) and their training."""

    networks: list[nn.Module]
    histories: list[History]  # one per Trainer.fit (seeds: one per member; snapshot: one)
    member_seconds: list[float]  # seconds of training that produced each member
    member_epochs: list[int]  # epochs of training behind each member (snapshot: cumulative)
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def history(self) -> History:
        """The first fit's history (the single model's epochs, then a snapshot run's later cycles)."""
        return self.histories[0]

    @property
    def epochs_trained(self) -> int:
        return sum(len(h) for h in self.histories)


def snapshot_cycles(epochs: int, members: int, cycle_epochs: int) -> list[int]:
    """Cycle lengths in epochs: the first cycle is the single model's `epochs`, each further member
    adds a cycle of `cycle_epochs`."""
    return [int(epochs)] + [int(cycle_epochs)] * (int(members) - 1)


def train_members(
    build: Callable[[], nn.Module],
    train: TensorData,
    valid: TensorData | None,
    *,
    members: int,
    kind: str,
    epochs: int,
    cycle_epochs: int,
    seed: int,
    trainer_kwargs: dict[str, Any],
    callbacks: Callable[[int], Sequence[Callback]] = lambda i: (),
) -> Members:
    """Train `members` networks built by `build` (called right after seeding).

    kind "seeds": member i is a fresh network trained with seed `seed + i` for `epochs` epochs of
    one-cycle (so member 0 is exactly the single-model run). kind "snapshot": one run from seed
    `seed` with a `restarts` schedule of cycles [epochs, cycle_epochs, ...]; the weights at each
    cycle's end are a member (the first cycle is the single-model run). `callbacks(i)` gives the
    extra callbacks of fit i (one fit for snapshots). `trainer_kwargs` go to `Trainer` (lr, wd,
    batch_size, quiet, ...; not seed, schedule or callbacks).
    """
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    if kind not in ENSEMBLE_KINDS:
        raise ValueError(f"ensemble kind must be one of {ENSEMBLE_KINDS}, got {kind!r}")
    t_all = time.perf_counter()
    if kind == "seeds" or members == 1:
        nets, hists, secs = [], [], []
        for i in range(members):
            torch.manual_seed(seed + i)
            model = build()
            trainer = Trainer(model, seed=seed + i, callbacks=list(callbacks(i)), **trainer_kwargs)
            t0 = time.perf_counter()
            hists.append(trainer.fit(train, valid, epochs=epochs))
            secs.append(time.perf_counter() - t0)
            nets.append(model.eval())
        return Members(nets, hists, secs, [epochs] * members, time.perf_counter() - t_all,
                       {"kind": kind, "members": members, "epochs": epochs})
    cycles = snapshot_cycles(epochs, members, cycle_epochs)
    ends = cycle_ends(cycles)
    torch.manual_seed(seed)
    model = build()
    snaps = Snapshots(ends)
    trainer = Trainer(model, seed=seed, schedule="restarts", schedule_kwargs={"cycles": cycles},
                      callbacks=[*callbacks(0), snaps], **trainer_kwargs)
    history = trainer.fit(train, valid, epochs=ends[-1])
    seconds = time.perf_counter() - t_all
    nets = []
    for state in snaps.states:
        net = copy.deepcopy(model)
        net.load_state_dict(state)
        nets.append(net.eval())
    per_epoch = [e["seconds"] for e in history]
    member_secs = [sum(per_epoch[:end]) for end in ends]
    return Members(nets, [history], member_secs, ends, seconds,
                   {"kind": kind, "members": members, "cycles": cycles})


def predict_mean(networks: Sequence[nn.Module], xs: Sequence[Tensor], batch_size: int = 65_536) -> Tensor:
    """The mean output of `networks` (eval mode, no grad) over all rows of `xs`, on the CPU."""
    n = xs[0].shape[0]
    out = torch.zeros(n)
    with torch.inference_mode():
        for net in networks:
            net.eval()
            device = next(net.parameters()).device
            for start in range(0, n, batch_size):
                out[start:start + batch_size] += net(*(x[start:start + batch_size].to(device) for x in xs)).float().cpu()
    return out / len(networks)
