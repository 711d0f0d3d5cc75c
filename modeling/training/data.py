"""In-memory tensor datasets and index batching: tensors are built once, batches slice a permutation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TensorData", "batches"]


@dataclass
class TensorData:
    """Model inputs `xs` (passed positionally to the model) and a 1-D target `y`, all row-aligned."""

    xs: tuple[Tensor, ...]
    y: Tensor

    def __post_init__(self) -> None:
        self.xs = tuple(self.xs)
        n = self.y.shape[0]
        for i, x in enumerate(self.xs):
            if x.shape[0] != n:
                raise ValueError(f"TensorData: xs[{i}] has {x.shape[0]} rows but y has {n}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def device(self) -> torch.device:
        return self.y.device

    def to(self, device: torch.device | str) -> TensorData:
        """Same data on `device` (returns self when already there, so no copy is made)."""
        device = torch.device(device)
        if all(_same_device(t.device, device) for t in (*self.xs, self.y)):
            return self
        return TensorData(tuple(x.to(device) for x in self.xs), self.y.to(device))

    def subset(self, idx: Tensor | slice) -> TensorData:
        """Rows selected by an index tensor, boolean mask or slice."""
        if isinstance(idx, Tensor):
            idx = idx.to(self.y.device)
        return TensorData(tuple(x[idx] for x in self.xs), self.y[idx])


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def batches(
    n: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    device: torch.device | str | None = None,
    drop_last: bool = False,
) -> Iterator[Tensor]:
    """Yield int64 index tensors of `batch_size` rows, sliced from one (seeded) permutation of range(n)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if device is not None:
        order = order.to(device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
