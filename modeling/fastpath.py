"""The forward pass of a bundle's TabularModel networks, prepared once per loaded bundle and run
by every path (batch chunks, small requests, members' spread): one implementation, so the paths
differ only in how many rows they hand over.

Why it is not the modules' forward: a one-record request spends most of its forward time in
module calls (an embedding module per categorical column, then Linear/ReLU/BatchNorm modules),
not in arithmetic. `TabularForward` gathers the embedding rows with NumPy takes from copies of
the tables (the same float32 values: exact), runs the hidden layers as the torch functional calls
the modules make (float32, the modules' exact bits for the same rows), and computes the head
(the last hidden layer's BatchNorm, the output Linear, the sigmoid range) and the members' mean
in float64.

Row bits: BLAS picks other float32 kernels for a few rows than for many (MKL: under 16 rows for
these shapes), so a hidden unit of a one-row call can differ from the same row's unit in a batch
by an ulp or two. `modeling.forward` therefore hands this class at least 16 rows on every path
(a small request padded with copies of its first row), from where a row's bits are the batch's
(tests/test_fastpath.py checks it on real shapes at one and two threads). The head is float64 and
a row-wise sum (no BLAS kernel choice at all), so that where float32 kernels still differ (other
thread counts, other CPUs) their ulps are passed on, not rounded up: a float32 head rounds the
log-scale output to float32 (an ulp of log(Sales) near 8 is 9.5e-7 of Sales) and turned the
hidden units' ulps into relative differences up to 2e-6 after exp; unpadded one-row calls with
the float64 head agreed to about 3e-7 on the serve_load bundle but up to 1e-6 on other weights,
which is why the padding stays. Padding to 16 instead of 32 rows saves about a third of a small
request's forward.

Networks of other classes (the ratings models) run through their modules (`modeling.forward`,
every slice padded to SMALL_BATCH_ROWS).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modeling.tabular import TabularModel

SMALL_BATCH_ROWS = 32  # module-path padding: from here up a row's float32 output does not depend on the batch
FLAT_GATHER_ROWS = 256  # up to this many rows: one take from the flat table; above, one take per table


class _PreparedTabular:
    """One TabularModel's weights laid out for `hidden`: its embedding tables (and a flat copy
    with the positions of each output column), then the modules' parameters for functional calls;
    the last hidden layer's BatchNorm is folded into the float64 head."""

    def __init__(self, model: TabularModel) -> None:
        self.model = model
        self.tables = [emb.weight.detach().numpy() for emb in model.embeds]
        dims = [t.shape[1] for t in self.tables]
        self.flat = np.concatenate([t.ravel() for t in self.tables]) if self.tables else np.zeros(0, np.float32)
        starts = np.cumsum([0, *[t.size for t in self.tables[:-1]]]).astype(np.int64)
        # output column k of the concatenated embeddings reads table column[k] at row code * dim + offset
        self.column = np.repeat(np.arange(len(self.tables)), dims)
        self.dim = np.repeat(np.array(dims, dtype=np.int64), dims)
        self.offset = np.repeat(starts, dims) + np.concatenate([np.arange(d) for d in dims]) if dims else \
            np.zeros(0, np.int64)
        self.blocks: list[tuple[nn.Linear, nn.BatchNorm1d | None]] = []
        for block in model.layers:
            mods = list(block)
            lin = next(m for m in mods if isinstance(m, nn.Linear))
            bn = next((m for m in mods if isinstance(m, nn.BatchNorm1d)), None)
            self.blocks.append((lin, bn))
        weight = model.head.weight.detach().double().numpy().reshape(-1)
        bias = float(model.head.bias.detach().double().numpy()[0])
        last_bn = self.blocks[-1][1] if self.blocks else None
        if last_bn is not None:  # head(bn(h)) = (w * scale) . h + (w . shift + b), in float64
            scale = last_bn.weight.detach().double().numpy() / np.sqrt(
                last_bn.running_var.detach().double().numpy() + last_bn.eps)
            shift = last_bn.bias.detach().double().numpy() - last_bn.running_mean.detach().double().numpy() * scale
            weight, bias = weight * scale, bias + float(weight @ shift)
        self.head_weight, self.head_bias = weight, bias

    def hidden(self, x_cat: np.ndarray, x_cont: np.ndarray) -> np.ndarray:
        """The last hidden layer's float32 activations (before its BatchNorm), [n, width]."""
        m = self.model
        parts = []
        if self.tables:
            if len(x_cat) <= FLAT_GATHER_ROWS:
                emb = self.flat[x_cat[:, self.column] * self.dim + self.offset]
            else:
                emb = np.concatenate([t[x_cat[:, j]] for j, t in enumerate(self.tables)], axis=1)
            parts.append(torch.from_numpy(emb))
        if m.n_cont:
            xc = torch.from_numpy(x_cont).float()
            parts.append(_batchnorm(m.bn_cont, xc) if m.bn_cont is not None else xc)
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for i, (lin, bn) in enumerate(self.blocks):
            x = F.relu(F.linear(x, lin.weight, lin.bias))
            if bn is not None and i < len(self.blocks) - 1:  # the last one is in the head
                x = _batchnorm(bn, x)
        return x.numpy()


def _batchnorm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class TabularForward:
    """Each member's output (float64, on the target's model scale) and their mean, for eval-mode
    TabularModel networks with one output; `prepare` says None for anything else."""

    def __init__(self, models: Sequence[TabularModel]) -> None:
        self.models = list(models)
        self.prepared = [_PreparedTabular(m) for m in self.models]
        ranges = [m.y_range for m in self.models]
        self.low = np.array([[r[0] if r else 0.0] for r in ranges], dtype=np.float64)
        self.high = np.array([[r[1] if r else 0.0] for r in ranges], dtype=np.float64)
        self.ranged = np.array([r is not None for r in ranges])

    @staticmethod
    def prepare(models: Sequence[nn.Module]) -> TabularForward | None:
        if models and all(type(m) is TabularModel and not m.training and m.out_sz == 1 for m in models):
            return TabularForward(models)  # type: ignore[arg-type]
        return None

    def members(self, x_cat: np.ndarray, x_cont: np.ndarray) -> np.ndarray:
        """[len(models), n] float64: each network's output for the rows."""
        with torch.inference_mode():
            # elementwise product and a row-wise sum (not a BLAS matvec, whose float64 kernels
            # also vary with the row count): a row's head sum never depends on the other rows
            z = np.stack([(p.hidden(x_cat, x_cont) * p.head_weight).sum(axis=1) + p.head_bias
                          for p in self.prepared])
        if self.ranged.all():
            return np.clip(1.0 / (1.0 + np.exp(-z)) * (self.high - self.low) + self.low, self.low, self.high)
        out = z.copy()
        ranged = np.flatnonzero(self.ranged)
        lo, hi = self.low[ranged], self.high[ranged]
        out[ranged] = np.clip(1.0 / (1.0 + np.exp(-z[ranged])) * (hi - lo) + lo, lo, hi)
        return out

    def __call__(self, x_cat: np.ndarray, x_cont: np.ndarray) -> np.ndarray:
        """The members' mean, [n] float64."""
        out = self.members(x_cat, x_cont)
        return out[0] if len(out) == 1 else out.mean(axis=0)
