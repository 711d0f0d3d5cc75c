"""Running a bundle's networks over pre-built arrays: the mean of the networks (a model and its
ensemble members), each member's output, and the small-request variant.

TabularModel networks run through `modeling.fastpath.TabularForward` on every path (batch chunks,
small requests, members' spread): a projected first layer, float32 hidden layers, a float64 head
and mean; it pads the inputs of its BLAS products itself (a short batch chunk or a small request:
to the fewest rows, at most PAD_ROWS, whose kernels give the batch's bits), so a row's answer has
the same bits whatever came with it. Other networks (the ratings models) run through their
modules, every slice under SMALL_BATCH_ROWS padded alike, so a row's float32 output does not
depend on how many rows came with it either."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from modeling.fastpath import TabularForward, padded_array

PREDICT_CHUNK = 65_536
TABULAR_CHUNK = 8_192  # rows per TabularForward call on the batch path: bounded float64 temporaries


def prepared(models: Sequence[torch.nn.Module], cache: dict[str, Any] | None) -> TabularForward | None:
    """`TabularForward.prepare(models)`, kept in `cache` (a predictor's, whose networks are fixed
    once loaded) so that preparing them (the projected tables: tens of ms) happens once per set of
    networks, not per call; without a cache, prepared for this call only."""
    if cache is None:
        return TabularForward.prepare(models)
    key = tuple(id(m) for m in models)
    if cache.get("key") != key:
        cache["key"], cache["forward"] = key, TabularForward.prepare(models)
    return cache["forward"]


def forward_chunks(models: Sequence[torch.nn.Module], inputs: Sequence[np.ndarray],
                   cache: dict[str, Any] | None = None) -> np.ndarray:
    """The mean output of `models` over pre-built arrays, in large slices (no per-row Python):
    float64 for TabularModel networks, else float32. `cache`: see `prepared`."""
    tabular = prepared(models, cache)
    if tabular is not None:
        return _tabular_chunks(tabular, inputs, members=False)
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


def _tabular_chunks(tabular: TabularForward, inputs: Sequence[np.ndarray], members: bool) -> np.ndarray:
    x_cat, x_cont = inputs
    n = len(x_cat)
    out = np.zeros((len(tabular.models), n) if members else n, dtype=np.float64)
    for start in range(0, n, TABULAR_CHUNK):
        rows = min(TABULAR_CHUNK, n - start)
        part = (x_cat[start : start + rows], x_cont[start : start + rows])
        out[..., start : start + rows] = tabular.members(*part) if members else tabular(*part)
    return out


def padded_rows(a: np.ndarray) -> torch.Tensor:
    """`padded_array` as a tensor (the module path)."""
    return torch.from_numpy(padded_array(a))


def forward_members(models: Sequence[torch.nn.Module], inputs: Sequence[np.ndarray],
                    cache: dict[str, Any] | None = None) -> np.ndarray:
    """Each model's output over pre-built arrays, [len(models), n] (one vectorized pass per model);
    the mean over axis 0 is `forward_chunks`'s answer. `cache`: see `prepared`."""
    tabular = prepared(models, cache)
    if tabular is not None:
        return _tabular_chunks(tabular, inputs, members=True)
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
    """`forward_chunks` for a small batch, as float64 with the batch path's bits, the networks
    prepared once per set of networks and kept in `cache`: TabularModel networks through
    `TabularForward` (which pads its products' inputs itself), others through their modules
    padded to SMALL_BATCH_ROWS."""
    tabular = prepared(models, {} if cache is None else cache)
    n = len(inputs[0])
    if tabular is not None:
        return tabular(*inputs)
    with torch.inference_mode():
        parts = [padded_rows(a) for a in inputs]
        acc = models[0](*parts).float()
        for m in models[1:]:
            acc = acc + m(*parts).float()
    return (acc / len(models)).numpy().reshape(-1)[:n].astype(np.float64)
