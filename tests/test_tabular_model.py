"""sigmoid_range, default_y_range and TabularModel."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling.tabular import TabularModel, default_y_range, sigmoid_range

EXTREMES = torch.tensor([-math.inf, -1e6, -80.0, -1.0, 0.0, 1.0, 80.0, 1e6, math.inf])


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (0.3, 0.7), (-5.0, 12.5), (0.0, 5.5)])
def test_sigmoid_range_stays_in_bounds_at_extremes(low: float, high: float) -> None:
    out = sigmoid_range(EXTREMES, low, high)
    lo32, hi32 = torch.tensor(low), torch.tensor(high)
    assert not out.isnan().any()
    assert (out >= lo32).all() and (out <= hi32).all()
    assert out[0] == lo32 and out[-1] == hi32
    assert out[4] == pytest.approx((low + high) / 2, rel=1e-6)
    assert (out.diff() >= 0).all()


@settings(max_examples=200, deadline=None)
@given(
    st.floats(-1e3, 1e3),
    st.floats(1e-3, 1e3),
    st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=16),
)
def test_sigmoid_range_property(low: float, width: float, xs: list[float]) -> None:
    high = low + width
    out = sigmoid_range(torch.tensor(xs, dtype=torch.float32), low, high)
    assert not out.isnan().any()
    assert (out >= torch.tensor(low)).all() and (out <= torch.tensor(high)).all()


def test_sigmoid_range_keeps_gradient_in_the_interior() -> None:
    x = torch.zeros(3, requires_grad=True)
    sigmoid_range(x, 0.0, 4.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 1.0))  # 4 * sigmoid'(0) = 1


def test_default_y_range() -> None:
    assert default_y_range([1.0, 3.0, 2.0]) == pytest.approx((0.9, 3.1))
    assert default_y_range(torch.tensor([0.0, 10.0]), pad=0.2) == pytest.approx((-2.0, 12.0))
    low, high = default_y_range(np.array([4.0, 4.0]))
    assert low < 4.0 < high
    assert default_y_range([np.nan, 1.0, 2.0]) == pytest.approx((0.95, 2.05))
    with pytest.raises(ValueError):
        default_y_range([])


def _model(**kw) -> TabularModel:
    defaults = dict(emb_szs=[(5, 3), (4, 2)], n_cont=3, layers=(16, 8), ps=0.1)
    return TabularModel(**{**defaults, **kw})


def _batch(n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x_cat = torch.stack(
        [torch.randint(0, 5, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)], 1
    )
    return x_cat, torch.randn(n, 3, generator=g)


def test_output_shapes() -> None:
    x_cat, x_cont = _batch()
    assert _model()(x_cat, x_cont).shape == (7,)
    assert _model(out_sz=3)(x_cat, x_cont).shape == (7, 3)
    assert _model(layers=())(x_cat, x_cont).shape == (7,)


def test_zero_categorical_and_zero_continuous_variants() -> None:
    x_cat, x_cont = _batch()
    no_cat = _model(emb_szs=[])
    assert no_cat(torch.empty(7, 0, dtype=torch.long), x_cont).shape == (7,)
    no_cont = _model(n_cont=0)
    assert no_cont.bn_cont is None
    assert no_cont(x_cat, torch.empty(7, 0)).shape == (7,)
    with pytest.raises(ValueError):
        _model(emb_szs=[], n_cont=0)


def test_wrong_input_width_is_rejected() -> None:
    x_cat, x_cont = _batch()
    with pytest.raises(ValueError, match="x_cat"):
        _model()(x_cat[:, :1], x_cont)
    with pytest.raises(ValueError, match="x_cont"):
        _model()(x_cat, x_cont[:, :2])


def test_y_range_respected_even_with_huge_activations() -> None:
    model = _model(y_range=(2.0, 3.0))
    with torch.no_grad():
        model.head.weight.fill_(1e4)
    x_cat, x_cont = _batch(32)
    for mode in (model.train, model.eval):
        mode()
        out = model(x_cat, x_cont * 1e3)
        assert ((out >= 2.0) & (out <= 3.0)).all()


def test_structure_and_init() -> None:
    model = _model(bn_cont=False, use_bn=False, ps=0.0)
    assert model.bn_cont is None
    assert not any(
        isinstance(m, torch.nn.BatchNorm1d | torch.nn.Dropout) for m in model.layers.modules()
    )
    big = TabularModel([(10_000, 50)], 0, layers=(8,))
    assert big.embeds[0].weight.std().item() < 0.02
    with pytest.raises(ValueError, match="ps"):
        _model(ps=[0.1])
    assert TabularModel([(5, 3)], 1, layers=(8, 8, 8)).ps == [0.001, 0.001, 0.01]


def test_config_round_trip_reproduces_outputs() -> None:
    model = _model(y_range=(0.0, 10.0), out_sz=2)
    x_cat, x_cont = _batch()
    model.train()
    model(x_cat, x_cont)  # move batch-norm running stats away from their init
    model.eval()
    cfg = json.loads(json.dumps(model.config()))
    clone = TabularModel.from_config(cfg)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    torch.testing.assert_close(clone(x_cat, x_cont), model(x_cat, x_cont))
    assert clone.config() == model.config()


def test_param_groups_partition_all_parameters_in_order() -> None:
    model = _model()
    groups = model.param_groups()
    assert len(groups) == 3
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in groups[0]} == {id(e.weight) for e in model.embeds}
    assert {id(p) for p in groups[2]} == {id(model.head.weight), id(model.head.bias)}
    assert id(model.bn_cont.weight) in {id(p) for p in groups[1]}


@pytest.fixture
def one_thread():
    """Two-core CI box shared with other jobs: multi-threaded tiny matmuls thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_learns_synthetic_signal(one_thread: None) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 3000
    cat = np.stack([rng.integers(1, 11, n), rng.integers(1, 5, n)], 1)
    cont = rng.normal(size=(n, 2)).astype(np.float32)
    effect_a, effect_b = rng.normal(0, 1.0, 11), rng.normal(0, 0.5, 5)
    y = effect_a[cat[:, 0]] + effect_b[cat[:, 1]] + 1.5 * cont[:, 0] - cont[:, 1] ** 2
    y = (y + rng.normal(0, 0.1, n)).astype(np.float32)
    x_cat, x_cont, yt = torch.as_tensor(cat), torch.as_tensor(cont), torch.as_tensor(y)
    tr, va = slice(0, 2500), slice(2500, n)
    model = TabularModel(
        [(11, 6), (5, 3)], 2, layers=(64, 32), ps=0.0, embed_p=0.0, y_range=default_y_range(y[tr])
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(25):
        for idx in torch.randperm(2500).split(128):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x_cat[tr][idx], x_cont[tr][idx]), yt[tr][idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        rmse = torch.sqrt(((model(x_cat[va], x_cont[va]) - yt[va]) ** 2).mean()).item()
    baseline = float(np.sqrt(((y[va] - y[tr].mean()) ** 2).mean()))
    assert rmse < 0.35 * baseline, (rmse, baseline)
