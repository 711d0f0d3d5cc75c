"""lr finder: leaves the model alone, sweeps exponentially, suggests a usable lr, plots."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from modeling.training import LRFinderResult, TensorData, fit, lr_find
from modeling.training.lr_finder import suggest_lr

D = 20


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze(-1)

    def param_groups(self) -> list[list[nn.Parameter]]:
        return [list(self.parameters())]


def problem(seed: int) -> tuple[TensorData, TensorData]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, D, generator=g)
    y = x @ torch.randn(D, generator=g) + 3.0 + 0.3 * torch.randn(3000, generator=g)
    return TensorData((x[:2400],), y[:2400]), TensorData((x[2400:],), y[2400:])


def new_model(seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    return Linear()


def test_lr_find_leaves_model_untouched_and_sweeps_exponentially():
    train, _ = problem(0)
    model = new_model()
    model.train(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lr_find(model, train, num_it=60, batch_size=64, quiet=True)
    assert isinstance(result, LRFinderResult)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not model.training
    assert len(result.lrs) == len(result.losses) == 60
    assert result.lrs[0] == pytest.approx(1e-7)
    assert result.lrs[-1] == pytest.approx(10.0)
    ratios = np.diff(np.log(result.lrs))
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-6)
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]


def test_lr_find_stops_when_loss_diverges():
    train, _ = problem(0)
    result = lr_find(new_model(), train, end_lr=1e5, num_it=200, batch_size=64, quiet=True)
    assert len(result.lrs) < 200
    assert all(math.isfinite(v) for v in result.losses)
    assert result.losses[-1] > 4.0 * min(result.losses)
    assert result.suggestion < result.lrs[-1] / 10


@pytest.mark.parametrize("seed", [0, 1])
def test_lr_find_suggestion_within_10x_of_swept_best(seed):
    train, valid = problem(seed)
    # Ground truth: one epoch of one-cycle training at each lr; keep the lr with best valid loss.
    grid = np.logspace(-3, 1, 9)
    losses = []
    for lr in grid:
        _, history = fit(new_model(seed), train, valid, epochs=1, lr=float(lr), batch_size=64,
                         quiet=True)  # fmt: skip
        losses.append(history[-1]["valid_loss"])
    best = float(grid[int(np.argmin(losses))])
    assert min(losses) < 0.1 * losses[0]  # the sweep does find a clearly better lr
    result = lr_find(new_model(seed), train, batch_size=64, seed=seed, quiet=True)
    assert best / 10 <= result.suggestion <= best * 10, (best, result.suggestion, result.method)


def test_plot_writes_png(tmp_path):
    train, _ = problem(0)
    result = lr_find(new_model(), train, num_it=30, batch_size=128, quiet=True)
    path = result.plot(tmp_path / "plots" / "lr.png")
    assert path.exists() and path.stat().st_size > 2000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suggest_lr_valley_lies_inside_the_descent():
    lrs = np.logspace(-6, 1, 71)
    x = np.log10(lrs)
    # Flat until 1e-3, falls until 1e-0, then blows up.
    loss = np.where(x < -3, 5.0, np.where(x < 0, 5.0 - (x + 3), 2.0 + 10 * x**2))
    lr, method = suggest_lr(lrs.tolist(), loss.tolist())
    assert method == "valley"
    assert 1e-3 < lr < 1.0
    assert lr == pytest.approx(1e-1, rel=0.3)  # two thirds of the way from 1e-3 to 1e0


def test_suggest_lr_falls_back_to_steepest():
    lrs = np.logspace(-5, 0, 50)
    loss = np.linspace(1.0, 3.0, 50)
    loss[30] = 0.2  # a lone dip: no descending stretch worth trusting
    lr, method = suggest_lr(lrs.tolist(), loss.tolist())
    assert method == "steepest"
    assert lr == pytest.approx(lrs[29])
