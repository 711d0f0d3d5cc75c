"""SparseDropout means nn.Dropout(p): independent drops at rate p, kept units scaled by 1/(1-p);
and bf16 training keeps a float32 output layer."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.train_step import ComposedDropout
from modeling.dropout import SparseDropout, dropped_positions
from modeling.tabular import TabularModel
from modeling.training.trainer import resolve_precision


def test_drop_counts_follow_the_binomial() -> None:
    torch.manual_seed(0)
    n, p, draws = 2_000, 0.01, 4_000
    counts = torch.tensor([float(dropped_positions(n, p).numel()) for _ in range(draws)])
    mean, var = n * p, n * p * (1 - p)
    assert abs(counts.mean().item() - mean) < 4 * math.sqrt(var / draws)
    assert 0.85 * var < counts.var().item() < 1.15 * var


def test_positions_are_uniform_sorted_unique_and_in_range() -> None:
    torch.manual_seed(1)
    n, p = 50, 0.05
    hits = torch.zeros(n)
    for _ in range(20_000):
        pos = dropped_positions(n, p)
        assert pos.dtype == torch.int64
        assert (pos >= 0).all() and (pos < n).all()
        assert (pos[1:] > pos[:-1]).all()  # no position twice
        hits[pos] += 1
    rate = hits / 20_000
    # each position's rate within 5 standard errors of p (a gap-sampling bug shows at the start or end)
    assert (rate - p).abs().max().item() < 5 * math.sqrt(p * (1 - p) / 20_000)


def test_edge_rates() -> None:
    assert dropped_positions(10, 0.0).numel() == 0
    assert dropped_positions(0, 0.5).numel() == 0
    assert torch.equal(dropped_positions(7, 1.0), torch.arange(7))


@pytest.mark.parametrize("p", [0.001, 0.04, 0.3])
def test_forward_and_backward_are_dropout(p: float) -> None:
    torch.manual_seed(2)
    layer = SparseDropout(p)
    x = torch.randn(400, 300, requires_grad=True)
    y = layer(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)
    frac = 1 - kept.float().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / x.numel())
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / (1 - p))
    layer.eval()
    assert torch.equal(layer(x), x)


def test_bf16_autocast_keeps_a_float32_output_layer() -> None:
    torch.manual_seed(3)
    model = TabularModel([(20, 5), (7, 3)], 4, layers=(32, 16), y_range=(0.0, 12.0)).eval()
    x_cat = torch.randint(0, 7, (64, 2))
    x_cont = torch.randn(64, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_cat, x_cont)
        hidden = model.layers(torch.cat([torch.cat([e(x_cat[:, i]) for i, e in enumerate(model.embeds)], 1),
                                         model.bn_cont(x_cont)], 1))
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.float32
    # the head of the bf16 hidden units in float32: not rounded to bf16's 8 bits (0.03 near 9)
    expected = torch.sigmoid(model.head(hidden.float())).squeeze(-1) * 12.0
    assert torch.allclose(out, expected, atol=1e-5)


def test_precision_resolution() -> None:
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16")


@pytest.mark.parametrize("p", [0.001, 0.04])
def test_same_bits_and_random_stream_as_the_composed_ops(p: float) -> None:
    """The autograd function changes the cost, not the numbers. Against the layer as plain autograd
    ops (its implementation before; `benchmarks/train_step.py` keeps it as its reference variant)
    the same seed drops the same units, outputs and input gradients (through a later layer, so the
    gradient is not constant) agree bit for bit, and the generator ends in the same state."""
    x = torch.randn(512, 216)
    w = torch.randn(216, 7)
    outs, grads, states = [], [], []
    for layer in (SparseDropout(p), ComposedDropout(p)):
        torch.manual_seed(3)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y @ w).square().sum().backward()
        outs.append(y.detach())
        grads.append(xi.grad)
        states.append(torch.get_rng_state())
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(states[0], states[1])
    assert (outs[0] == 0).any()


def test_non_contiguous_input_and_gradient() -> None:
    """A transposed input (and so a transposed incoming gradient) is dropped like its copy."""
    torch.manual_seed(4)
    x = torch.randn(300, 200).t().requires_grad_(True)
    y = SparseDropout(0.05)(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.95)
    y.t().sum().backward()  # the gradient arrives transposed
    assert torch.allclose(x.grad, kept.float() / 0.95)
