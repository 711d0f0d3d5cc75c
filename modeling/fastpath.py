"""The networks' forward pass for small requests, prepared once per loaded bundle.

A one-record request spends most of its forward time in module calls (an embedding module per
categorical column, then Linear/ReLU/BatchNorm modules), not in arithmetic. `SmallForward`
gathers every embedding row with one NumPy take from a flat copy of the tables (a copy of the
same float32 values: exact) and runs the rest as the same torch functional calls the modules
make, so the output has the modules' exact float32 bits; the batch is padded to
SMALL_BATCH_ROWS rows, from where BLAS gives a row the bits any larger batch (batch scoring)
gives it. Networks of other classes run through their modules (`modeling.forward.forward_chunks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modeling.tabular import TabularModel

SMALL_BATCH_ROWS = 32  # from this many rows up, a row's float32 output does not depend on the batch


@dataclass
class _Block:
    linear: nn.Linear
    batchnorm: nn.BatchNorm1d | None


class _PreparedTabular:
    """One TabularModel's weights laid out for `__call__`: a flat embedding table with the
    positions of each output column, then the modules' parameters for functional calls."""

    def __init__(self, model: TabularModel) -> None:
        self.model = model
        tables = [emb.weight.detach().numpy() for emb in model.embeds]
        dims = [t.shape[1] for t in tables]
        self.flat = np.concatenate([t.ravel() for t in tables]) if tables else np.zeros(0, np.float32)
        starts = np.cumsum([0, *[t.size for t in tables[:-1]]]).astype(np.int64)
        # output column k of the concatenated embeddings reads table column[k] at row code * dim + offset
        self.column = np.repeat(np.arange(len(tables)), dims)
        self.dim = np.repeat(np.array(dims, dtype=np.int64), dims)
        self.offset = np.repeat(starts, dims) + np.concatenate([np.arange(d) for d in dims]) if dims else \
            np.zeros(0, np.int64)
        self.blocks = []
        for block in model.layers:
            mods = list(block)
            lin = next(m for m in mods if isinstance(m, nn.Linear))
            bn = next((m for m in mods if isinstance(m, nn.BatchNorm1d)), None)
            self.blocks.append(_Block(lin, bn))

    def __call__(self, x_cat: np.ndarray, x_cont: np.ndarray) -> torch.Tensor:
        m = self.model
        parts = []
        if len(self.column):
            idx = x_cat[:, self.column] * self.dim + self.offset
            parts.append(torch.from_numpy(self.flat[idx]))
        if m.n_cont:
            xc = torch.from_numpy(x_cont).float()
            parts.append(_batchnorm(m.bn_cont, xc) if m.bn_cont is not None else xc)
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for b in self.blocks:
            x = F.relu(F.linear(x, b.linear.weight, b.linear.bias))
            if b.batchnorm is not None:
                x = _batchnorm(b.batchnorm, x)
        x = F.linear(x, m.head.weight, m.head.bias)
        if m.y_range is not None:
            low, high = m.y_range
            x = (torch.sigmoid(x) * (high - low) + low).clamp(min=low, max=high)
        return x.squeeze(-1) if m.out_sz == 1 else x


def _batchnorm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class SmallForward:
    """The mean output of `models` (the bundle's networks: averaged as `forward_chunks` does) for
    a small batch, as float64 with the batch path's float32 bits."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.models = list(models)
        self.prepared = [_PreparedTabular(m) if type(m) is TabularModel and not m.training else None
                         for m in self.models]

    def __call__(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        n = len(inputs[0])
        if n < SMALL_BATCH_ROWS:
            pad = SMALL_BATCH_ROWS - n
            inputs = [np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) for a in inputs]
        with torch.inference_mode():
            acc = None
            for model, prepared in zip(self.models, self.prepared, strict=True):
                if prepared is not None:
                    out = prepared(*inputs).float()
                else:
                    out = model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]).float()
                acc = out if acc is None else acc + out
            assert acc is not None
            return (acc / len(self.models)).numpy().reshape(-1)[:n].astype(np.float64)
