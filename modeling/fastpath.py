"""The forward pass of a bundle's TabularModel networks, prepared once per loaded bundle and run
by every path (batch chunks, small requests, members' spread): one implementation, so the paths
differ only in how many rows they hand over.

Why it is not the modules' forward: a one-record request spent most of its forward time in module
calls and in the first layer's matrix product, and a row's float32 bits from a BLAS product
depend on how many rows came with it (MKL picks other kernels under 16 rows for these shapes).

First layer, projected (`_Projected`, the default): the first Linear is linear in each embedding,
so each table is pushed through its slice of the first Linear once at load (P_j = E_j W1_j^T,
computed in float64, stored float32, all members side by side: [codes, members x width]); the
continuous inputs' rows are W1's columns with their BatchNorm folded in, and one more row holds
the bias. A row's first layer is then a weighted sum of its gathered rows (weight 1 for a code,
the value for a continuous input), one `embedding_bag` call for every member: a per-row sum in a
fixed order, no BLAS kernel choice, so its bits never depend on the row count, and it reads a
few dozen table rows instead of the first layer's whole weight matrix (which was a third of a
padded request's forward and most of its memory traffic). Tables too big to project (huge
vocabularies; see PROJECTION_LIMIT) and networks without hidden layers take the gathered first
layer instead (`_Gathered`: the embeddings' rows, then the modules' own functional calls).

Later layers are BLAS products; each hidden BatchNorm is folded into the next Linear (float64
fold, float32 weights). Their inputs are padded to PAD_ROWS rows (copies of the first row) when a
call has fewer, from where MKL's float32 kernels give a row the batch's bits (tests/test_fastpath.py
checks it on real shapes at one and two threads); unpadded one-row products differ by an ulp or
two, which reached 1e-6 of Sales on real-shaped weights, so the padding stays. With the projected
first layer only the second layer's product is padded.

The head (the last hidden layer's BatchNorm, the output Linear, the sigmoid range) and the
members' mean are float64 and row-wise sums (no BLAS kernel choice), so where float32 kernels
still differ (other thread counts, other CPUs) their ulps are passed on, not rounded up.

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
PAD_ROWS = 16  # MKL's float32 kernels for TabularModel shapes give a row the batch's bits from 16 rows up
FLAT_GATHER_ROWS = 256  # gathered first layer: up to this many rows one take from the flat table
PROJECTION_LIMIT = 64 * 2**20  # float32 values in a projected first-layer table (256 MB); above: gathered


def _np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[np.ndarray, np.ndarray]:
    """An eval-mode BatchNorm as x * scale + shift, in float64."""
    scale = _np64(bn.weight) / np.sqrt(_np64(bn.running_var) + bn.eps)
    return scale, _np64(bn.bias) - _np64(bn.running_mean) * scale


def _blocks(model: TabularModel) -> list[tuple[nn.Linear, nn.BatchNorm1d | None]]:
    out = []
    for block in model.layers:
        mods = list(block)
        lin = next(m for m in mods if isinstance(m, nn.Linear))
        out.append((lin, next((m for m in mods if isinstance(m, nn.BatchNorm1d)), None)))
    return out


def _head(model: TabularModel) -> tuple[np.ndarray, float]:
    """The output Linear with the last hidden layer's BatchNorm folded in, float64:
    head(bn(h)) = (w * scale) . h + (w . shift + b)."""
    weight = _np64(model.head.weight).reshape(-1)
    bias = float(_np64(model.head.bias)[0])
    blocks = _blocks(model)
    if blocks and blocks[-1][1] is not None:
        scale, shift = _bn_affine(blocks[-1][1])  # type: ignore[arg-type]
        weight, bias = weight * scale, bias + float(weight @ shift)
    return weight, bias


def padded(x: torch.Tensor, rows: int = PAD_ROWS) -> torch.Tensor:
    """At least `rows` rows (the first row repeated): the padding rows' outputs are dropped."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x[:1].expand(rows - len(x), -1)])


def padded_array(a: np.ndarray, rows: int = SMALL_BATCH_ROWS) -> np.ndarray:
    """A slice of at least `rows` rows (the first row repeated): below that BLAS picks other
    kernels and a row's float32 output would depend on how many rows came with it (a short last
    chunk, a small request); the padding rows' outputs are dropped."""
    if len(a) < rows:
        a = np.concatenate([a, np.repeat(a[:1], rows - len(a), axis=0)])
    return np.ascontiguousarray(a)


class _Projected:
    """All members' first layer as one table of projected embedding rows (see the module
    docstring), then each member's later Linear layers with the previous BatchNorm folded in."""

    def __init__(self, models: Sequence[TabularModel]) -> None:
        first = models[0]
        self.width = first.layer_sizes[0]
        self.n_cat, self.n_cont = len(first.emb_szs), first.n_cont
        n_emb = sum(d for _, d in first.emb_szs)
        codes = np.array([n for n, _ in first.emb_szs], dtype=np.int64)
        self.offsets = np.cumsum(np.concatenate([[0], codes]))[:-1].astype(np.int64)
        self.cont_rows = int(codes.sum()) + np.arange(self.n_cont, dtype=np.int64)
        self.bias_row = int(codes.sum()) + self.n_cont
        starts = np.concatenate([[0], np.cumsum([d for _, d in first.emb_szs])]).astype(int)
        columns = []  # per member: [rows, width], stacked side by side
        self.later: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for m in models:
            blocks = _blocks(m)
            w1, b1 = _np64(blocks[0][0].weight), _np64(blocks[0][0].bias)
            parts = [_np64(emb.weight) @ w1[:, starts[j]:starts[j + 1]].T for j, emb in enumerate(m.embeds)]
            w_cont = w1[:, n_emb:]
            if m.bn_cont is not None:  # W1 (x * scale + shift) = (W1 * scale) x + W1 shift
                scale, shift = _bn_affine(m.bn_cont)
                b1 = b1 + w_cont @ shift
                w_cont = w_cont * scale
            parts += [w_cont.T, b1[None, :]]
            columns.append(np.concatenate(parts))
            later = []
            for (_, bn), (lin, _) in zip(blocks[:-1], blocks[1:], strict=True):
                w, b = _np64(lin.weight), _np64(lin.bias)
                if bn is not None:  # W (h * scale + shift) + b = (W * scale) h + (W shift + b)
                    scale, shift = _bn_affine(bn)
                    w, b = w * scale, b + w @ shift
                later.append((torch.from_numpy(w.astype(np.float32)), torch.from_numpy(b.astype(np.float32))))
            self.later.append(later)
        self.table = torch.from_numpy(np.ascontiguousarray(np.concatenate(columns, axis=1), dtype=np.float32))
        self._starts: dict[int, torch.Tensor] = {}

    @staticmethod
    def size(models: Sequence[TabularModel]) -> int:
        """float32 values the projected table of `models` would hold."""
        m = models[0]
        return (sum(n for n, _ in m.emb_szs) + m.n_cont + 1) * m.layer_sizes[0] * len(models)

    def hidden(self, x_cat: np.ndarray, x_cont: np.ndarray) -> list[np.ndarray]:
        """Each member's last hidden layer's float32 activations (before its BatchNorm), [n, width]."""
        n, k = len(x_cat), self.n_cat + self.n_cont + 1
        index = np.empty((n, k), dtype=np.int64)
        weight = np.ones((n, k), dtype=np.float32)
        index[:, : self.n_cat] = x_cat
        index[:, : self.n_cat] += self.offsets
        index[:, self.n_cat : self.n_cat + self.n_cont] = self.cont_rows
        index[:, -1] = self.bias_row
        weight[:, self.n_cat : self.n_cat + self.n_cont] = x_cont
        # the op behind F.embedding_bag (mode 0: sum), without its wrapper's checks: bag i is
        # index[i], summed in order with its weights
        first = torch.embedding_bag(self.table, torch.from_numpy(index.reshape(-1)), self._offsets(n, k),
                                    False, 0, False, torch.from_numpy(weight.reshape(-1)))[0].relu_()
        if self.later[0]:
            first = padded(first)
        out = []
        for j, later in enumerate(self.later):
            x = first[:, j * self.width : (j + 1) * self.width]
            for w, b in later:
                x = F.linear(x, w, b).relu_()
            out.append(x[:n].numpy())
        return out

    def _offsets(self, n: int, k: int) -> torch.Tensor:
        """Bag starts 0, k, 2k, ... (kept for request sizes up to FLAT_GATHER_ROWS)."""
        if n > FLAT_GATHER_ROWS:
            return torch.arange(0, n * k, k)
        cached = self._starts.get(n)
        if cached is None:
            cached = self._starts[n] = torch.arange(0, n * k, k)
        return cached


class _Gathered:
    """One network's first layer from its gathered embedding rows and its modules' functional
    calls (float32, the modules' exact bits for the same rows), inputs padded to PAD_ROWS; for
    tables too big to project and networks without hidden layers."""

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
        self.blocks = _blocks(model)

    def hidden(self, x_cat: np.ndarray, x_cont: np.ndarray) -> np.ndarray:
        """The last hidden layer's float32 activations (before its BatchNorm), [n, width]."""
        m, n = self.model, len(x_cat)
        if self.blocks and n < PAD_ROWS:
            x_cat, x_cont = padded_array(x_cat, PAD_ROWS), padded_array(x_cont, PAD_ROWS)
        parts = []
        if self.tables:
            if len(x_cat) <= FLAT_GATHER_ROWS:
                emb = self.flat[x_cat[:, self.column] * self.dim + self.offset]
            else:
                emb = np.concatenate([t[x_cat[:, j]] for j, t in enumerate(self.tables)], axis=1)
            parts.append(torch.from_numpy(emb))
        if m.n_cont:
            xc = torch.from_numpy(np.ascontiguousarray(x_cont)).float()
            parts.append(_batchnorm(m.bn_cont, xc) if m.bn_cont is not None else xc)
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for i, (lin, bn) in enumerate(self.blocks):
            x = F.relu(F.linear(x, lin.weight, lin.bias))
            if bn is not None and i < len(self.blocks) - 1:  # the last one is in the head
                x = _batchnorm(bn, x)
        return x[:n].numpy()


def _sigmoid_range(z: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """sigmoid(z) scaled to [low, high], clipped (np.clip's answers; two ufuncs cost less)."""
    return np.minimum(np.maximum(1.0 / (1.0 + np.exp(-z)) * (high - low) + low, low), high)


def _batchnorm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class TabularForward:
    """Each member's output (float64, on the target's model scale) and their mean, for eval-mode
    TabularModel networks with one output; `prepare` says None for anything else. Any number of
    rows per call: calls with fewer than PAD_ROWS rows are padded inside."""

    def __init__(self, models: Sequence[TabularModel]) -> None:
        self.models = list(models)
        heads = [_head(m) for m in self.models]
        self.head_weight = [w for w, _ in heads]
        self.head_bias = np.array([[b] for _, b in heads], dtype=np.float64)
        shapes = {(tuple(m.emb_szs), m.n_cont, tuple(m.layer_sizes)) for m in self.models}
        self.projected = _Projected(self.models) if (
            len(shapes) == 1 and self.models[0].layer_sizes and _Projected.size(self.models) <= PROJECTION_LIMIT
        ) else None
        self.gathered = [] if self.projected is not None else [_Gathered(m) for m in self.models]
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
        if len(x_cat) == 0:
            return np.zeros((len(self.models), 0), dtype=np.float64)
        x_cont = x_cont.astype(np.float32, copy=False)
        with torch.inference_mode():
            hidden = self.projected.hidden(x_cat, x_cont) if self.projected is not None else \
                [g.hidden(x_cat, x_cont) for g in self.gathered]
            # elementwise product and a row-wise sum (not a BLAS matvec, whose float64 kernels
            # also vary with the row count): a row's head sum never depends on the other rows
            z = np.stack([(h * w).sum(axis=1) for h, w in zip(hidden, self.head_weight, strict=True)])
        z += self.head_bias
        if self.ranged.all():
            return _sigmoid_range(z, self.low, self.high)
        out = z.copy()
        ranged = np.flatnonzero(self.ranged)
        out[ranged] = _sigmoid_range(z[ranged], self.low[ranged], self.high[ranged])
        return out

    def __call__(self, x_cat: np.ndarray, x_cont: np.ndarray) -> np.ndarray:
        """The members' mean, [n] float64."""
        out = self.members(x_cat, x_cont)
        return out[0] if len(out) == 1 else out.sum(axis=0) / len(out)  # = mean(axis=0), less wrapper
