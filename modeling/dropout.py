"""Dropout for small rates that draws one random number per dropped unit, not one per unit.

Why: on CPU, `nn.Dropout` draws a Bernoulli number for every activation, and torch's CPU random
generator is slow. The Rossmann network's rates are tiny (0.04 on the embeddings, 0.001 and 0.01 on
the hidden layers), yet drawing those masks took about a fifth of a training step at batch 512 on
the 2-core benchmark machine: more than the second hidden layer's matmul.

`SparseDropout` samples the same thing differently: the dropped positions of an i.i.d.
Bernoulli(p) process over the n activations, as a running sum of geometric gaps (the gap to the
next dropped unit is Geometric(p) on {1, 2, ...}). That needs about n*p random numbers. Every unit
is still dropped independently with probability p and the kept ones are scaled by 1/(1-p), so the
layer means what `nn.Dropout(p)` means; only the random stream differs. Rates above
`SPARSE_MAX_P`, eval mode and `p == 0` take the plain `F.dropout` path.

It subclasses `nn.Dropout`, so it has no parameters or buffers: state dicts and bundles are the
same as with `nn.Dropout`.

The layer is one autograd function (`_SparseDrop`): forward scales into a new tensor and zeroes the
dropped positions in it; backward does the same to the incoming gradient. Written with plain
autograd ops (a multiply, then an in-place `index_fill_`), backward would also clone the whole
gradient for the in-place step: one more pass over every activation, 4-6% of a training step of
the Rossmann network on a 2-core VM (`benchmarks/train_step.py`, `composed_fp32`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SPARSE_MAX_P", "SparseDropout", "dropped_positions"]

SPARSE_MAX_P = 0.1  # above this the gaps are short and a dense mask is as cheap


def dropped_positions(n: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """Sorted int64 positions in [0, n), each included independently with probability p."""
    if n <= 0 or p <= 0.0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if p >= 1.0:
        return torch.arange(n, device=device)
    log_q = math.log1p(-p)
    mean = n * p
    chunk = int(mean + 6.0 * math.sqrt(mean) + 16)  # almost always enough gaps in one draw
    positions: list[Tensor] = []
    start = -1.0  # position of the last dropped unit so far
    while True:
        u = torch.rand(chunk, dtype=torch.float64, device=device)
        gaps = torch.floor(torch.log1p(-u) / log_q) + 1.0  # Geometric(p) on {1, 2, ...}
        pos = torch.cumsum(gaps, 0) + start
        positions.append(pos)
        start = float(pos[-1])
        if start >= n - 1:
            break
    pos = torch.cat(positions) if len(positions) > 1 else positions[0]
    return pos[pos < n].to(torch.int64)


def _scaled_zeroed(x: Tensor, scale: float, pos: Tensor) -> Tensor:
    """A new contiguous tensor `x * scale` with the flat positions `pos` set to 0: one pass."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x, scale, out=out)
    if pos.numel():
        out.view(-1).index_fill_(0, pos, 0.0)
    return out


class _SparseDrop(torch.autograd.Function):
    """Dropout at the given flat positions, kept units scaled: the same map forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float, pos: Tensor) -> Tensor:
        ctx.scale = scale
        ctx.save_for_backward(pos)
        return _scaled_zeroed(x, scale, pos)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (pos,) = ctx.saved_tensors
        return _scaled_zeroed(grad, ctx.scale, pos), None, None


class SparseDropout(nn.Dropout):
    """`nn.Dropout(p)` whose mask costs about n*p random draws instead of n (see the module doc)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or self.p > SPARSE_MAX_P or self.inplace:
            return F.dropout(x, self.p, self.training, self.inplace)
        pos = dropped_positions(x.numel(), self.p, x.device)
        return _SparseDrop.apply(x, 1.0 / (1.0 - self.p), pos)
