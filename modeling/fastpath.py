"""The forward pass of a bundle's TabularModel networks, prepared once per loaded bundle and run
by every path (batch chunks, small requests, members' spread): one implementation, so the paths
differ only in how many rows they hand over.

Why it is not the modules' forward: a one-record request spent most of its forward time in module
calls and in the first layer's matrix product, and a row's float32 bits from a BLAS product
depend on how many rows came with it (MKL picks other kernels for a few rows).

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
fold, float32 weights). A call with fewer than PAD_ROWS rows runs them on more rows, since MKL's
float32 kernels give a row the batch's bits only from some row count up (unpadded one-row products
differ by an ulp or two, which reached 1e-6 of Sales on real-shaped weights). That count depends
on the CPU and the thread count (16 on a Xeon VM; 4 on an AMD EPYC VM at one thread, where two
threads agree only at multiples of 4 and from 12 up), so `_Projected._calibrate` finds it once per
thread count with random inputs of the runtime's layout (kernel choice depends on shapes, not
values): n rows run as the fewest rows from n up that agree, at most PAD_ROWS. The extra rows are
empty bags of the first layer's `embedding_bag` (zeros, dropped at the end): no copy.
tests/test_fastpath.py checks every request size against batch scoring on real shapes at one and
two threads.

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
PAD_ROWS = 16  # from here up MKL's float32 kernels give a row the batch's bits (fewer: calibrated)
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
        self._starts: dict[tuple[int, int], torch.Tensor] = {}
        self._pad_to: dict[int, np.ndarray] = {}  # torch thread count -> rows to run n rows on

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
        rows = self._rows(n) if self.later[0] else n
        # the op behind F.embedding_bag (mode 0: sum), without its wrapper's checks: bag i is
        # index[i], summed in order with its weights; bags n..rows-1 are empty (zero rows: the
        # padding of the products' inputs, dropped at the end)
        first = torch.embedding_bag(self.table, torch.from_numpy(index.reshape(-1)), self._offsets(n, k, rows),
                                    False, 0, False, torch.from_numpy(weight.reshape(-1)))[0].relu_()
        return [x[:n].numpy() for x in self._later(first)]

    def _later(self, first: torch.Tensor) -> list[torch.Tensor]:
        """Each member's later layers over the first layer's (relu'd) output, all its rows."""
        out = []
        for j, later in enumerate(self.later):
            x = first[:, j * self.width : (j + 1) * self.width]
            for w, b in later:
                x = F.linear(x, w, b).relu_()
            out.append(x)
        return out

    def _rows(self, n: int) -> int:
        """Rows to run the products on for n rows: n from PAD_ROWS up, else the smallest row
        count from n up whose bits this process's BLAS kernels give as the batch's
        (`_calibrate`, once per thread count)."""
        if n >= PAD_ROWS:
            return n
        threads = torch.get_num_threads()
        table = self._pad_to.get(threads)
        if table is None:
            table = self._pad_to[threads] = self._calibrate()
        return int(table[n])

    def _calibrate(self, trials: int = 3, reference: int = 4 * PAD_ROWS) -> np.ndarray:
        """For each n < PAD_ROWS, the smallest m >= n (at most PAD_ROWS) such that the later
        layers run on m rows give each row the bits it gets among `reference` rows (see the module
        docstring). A size is ruled out by one differing value in `trials` random draws; inputs
        are fresh [m, members x width] tensors sliced per member, as at run time."""
        gen = torch.Generator().manual_seed(0)
        cols = self.width * len(self.later)
        good = np.ones(PAD_ROWS, dtype=bool)  # good[m]: m rows give the batch's bits
        good[0] = False
        with torch.inference_mode():
            for _ in range(trials):
                full = torch.rand(reference, cols, generator=gen)
                want = self._later(full)
                for m in np.flatnonzero(good):
                    got = self._later(full[: int(m)].clone())
                    good[m] = all(torch.equal(g, w[: int(m)]) for g, w in zip(got, want, strict=True))
        pad_to = np.full(PAD_ROWS, PAD_ROWS, dtype=np.int64)
        for n in range(PAD_ROWS - 1, 0, -1):
            pad_to[n] = n if good[n] else (pad_to[n + 1] if n + 1 < PAD_ROWS else PAD_ROWS)
        return pad_to

    def _offsets(self, n: int, k: int, rows: int) -> torch.Tensor:
        """Bag starts 0, k, 2k, ..., then rows - n empty bags at n*k (kept for request sizes up to
        FLAT_GATHER_ROWS)."""
        if n > FLAT_GATHER_ROWS:
            return torch.arange(0, n * k, k)
        cached = self._starts.get((n, rows))
        if cached is None:
            starts = np.concatenate([np.arange(0, n * k, k), np.full(rows - n, n * k)]).astype(np.int64)
            cached = self._starts[(n, rows)] = torch.from_numpy(starts)
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

    def warm_up(self) -> None:
        """Calibrate the small-request padding for this thread count now (see `_Projected._rows`)."""
        if self.projected is not None and self.projected.later[0]:
            self.projected._rows(1)

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
