"""Running a bundle's networks over pre-built arrays: the mean of the networks (a model and its
ensemble members), each member's output, and the small-request variant. Every path pads a slice
shorter than SMALL_BATCH_ROWS the same way, so a row's float32 output does not depend on how
many rows came with it (batch chunk, small request, single record)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from modeling.fastpath import SMALL_BATCH_ROWS, SmallForward

PREDICT_CHUNK = 65_536


def forward_chunks(models: Sequence[torch.nn.Module], inputs: Sequence[np.ndarray]) -> np.ndarray:
    """The mean output of `models` over pre-built arrays, in large slices (no per-row Python)."""
    n = len(inputs[0])
    out = np.zeros(n, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n, PREDICT_CHUNK):
            rows = min(PREDICT_CHUNK, n - start)
            parts = [padded_rows(a[start : start + rows]) for a in inputs]
            acc = models[0](*parts).float()
            for m in models[1:]:
                acc = acc + m(*parts).float()
            out[start : start + rows] = (acc / len(models)).numpy().reshape(-1)[:rows]
    return out


def padded_rows(a: np.ndarray) -> torch.Tensor:
    """A slice as a tensor of at least SMALL_BATCH_ROWS rows (the first row repeated): below that
    BLAS picks other kernels and a row's float32 output would depend on how many rows came with
    it (a short last chunk, a small request); the padding rows' outputs are dropped."""
    if len(a) < SMALL_BATCH_ROWS:
        a = np.concatenate([a, np.repeat(a[:1], SMALL_BATCH_ROWS - len(a), axis=0)])
    return torch.from_numpy(np.ascontiguousarray(a))


def forward_members(models: Sequence[torch.nn.Module], inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Each model's output over pre-built arrays, [len(models), n] (one vectorized pass per model)."""
    n = len(inputs[0])
    out = np.zeros((len(models), n), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n, PREDICT_CHUNK):
            rows = min(PREDICT_CHUNK, n - start)
            parts = [padded_rows(a[start : start + rows]) for a in inputs]
            for j, m in enumerate(models):
                out[j, start : start + rows] = m(*parts).float().numpy().reshape(-1)[:rows]
    return out


def forward_small(models: Sequence[torch.nn.Module], inputs: Sequence[np.ndarray],
                  cache: dict[str, Any] | None = None) -> np.ndarray:
    """`forward_chunks` for a small batch, as float64 with the batch path's exact float32 bits
    (`modeling.fastpath.SmallForward`, prepared once per set of networks and kept in `cache`)."""
    cache = {} if cache is None else cache
    key = tuple(id(m) for m in models)
    if cache.get("key") != key:
        cache["key"], cache["forward"] = key, SmallForward(models)
    return cache["forward"](inputs)
