"""Objectives: training losses that need the model and the whole batch, not only (prediction,
target). A ranking loss, for one, scores items that are not in the batch (sampled negatives,
or the whole catalogue) and looks up each row's positives; `Trainer(objective=...)` trains with
one in the same loop (schedule, AdamW, seeding, progress bar, DDP) as a plain loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Objective"]


class Objective:
    """The loss of one batch: `objective(model, xs, y)` -> a scalar tensor.

    `start(seed, device)` runs at the start of every fit (and so every lr-finder run): an
    objective that samples seeds its own generator there and moves its tensors to the device,
    so the same seed draws the same negatives. The model must be called through the `model`
    argument (under torchrun it is the DistributedDataParallel wrapper), once per batch.
    """

    generator: torch.Generator | None = None

    def start(self, seed: int, device: torch.device) -> None:
        """Seed the objective's generator (on `device`) and move its tensors there."""
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, model: nn.Module, xs: tuple[Tensor, ...], y: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError
