"""DotProductBias, EmbeddingNN, scoring, top-k and similar items."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling.collab import (
    DotProductBias,
    EmbeddingNN,
    item_biases,
    item_factors,
    score_all_items,
    similar_items,
    top_k,
)
from modeling.embeddings import emb_sz_rule


@pytest.fixture
def one_thread():
    """Two-core CI box shared with other jobs: multi-threaded tiny matmuls thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pairs(n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 12, (n,), generator=g), torch.randint(0, 20, (n,), generator=g)


MODELS = [
    lambda: DotProductBias(12, 20, n_factors=4),
    lambda: EmbeddingNN(12, 20, layers=(16, 8), ps=0.2, embed_p=0.1),
]


@pytest.mark.parametrize("make", MODELS)
def test_forward_shape_and_range(make) -> None:
    model = make()
    users, items = _pairs()
    out = model(users, items)
    assert out.shape == (9,) and out.dtype == torch.float32
    assert ((out >= 0.0) & (out <= 5.5)).all()


def test_dot_product_init_and_no_y_range() -> None:
    model = DotProductBias(12, 20, n_factors=4, y_range=None)
    assert (model.user_bias.weight == 0).all() and (model.item_bias.weight == 0).all()
    assert model.item_emb.weight.abs().max() < 0.05
    users, items = _pairs()
    expected = (model.user_emb(users) * model.item_emb(items)).sum(1)
    torch.testing.assert_close(model(users, items), expected)


def test_embedding_nn_default_sizes_follow_rule() -> None:
    model = EmbeddingNN(944, 1683)
    assert (model.user_sz, model.item_sz) == (emb_sz_rule(944), emb_sz_rule(1683))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    assert any(
        isinstance(m, torch.nn.BatchNorm1d) for m in EmbeddingNN(5, 5, use_bn=True).modules()
    )


@pytest.mark.parametrize("make", MODELS)
def test_config_round_trip_and_param_groups(make) -> None:
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    clone = type(model).from_config(json.loads(json.dumps(model.config())))
    clone.load_state_dict(model.state_dict())
    clone.eval()
    users, items = _pairs()
    torch.testing.assert_close(clone(users, items), model(users, items))
    groups = model.param_groups()
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(model.item_emb.weight), id(model.user_emb.weight)} == {id(p) for p in groups[0]}


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("training", [True, False])
def test_score_all_items_matches_pairwise_forward(make, training: bool) -> None:
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.train(training)
    users = torch.tensor([0, 3, 7, 11, 3])
    scores = score_all_items(model, users, chunk=2)
    assert scores.shape == (5, 20) and not scores.requires_grad
    assert model.training is training
    model.eval()
    with torch.no_grad():
        pair_u = users.repeat_interleave(20)
        pair_i = torch.arange(20).repeat(5)
        expected = model(pair_u, pair_i).view(5, 20)
    torch.testing.assert_close(scores, expected)


def _reference_top_k(scores: np.ndarray, k: int, excluded: list[set[int]]) -> list[list[int]]:
    """Plain-Python ranking: higher score, then lower index; item 0 and excluded removed."""
    out = []
    for r, row in enumerate(scores):
        keep = [j for j in range(len(row)) if j != 0 and j not in excluded[r]]
        ranked = sorted(keep, key=lambda j: (-row[j], j))[:k]
        out.append(ranked + [-1] * (k - len(ranked)))
    return out


def test_top_k_excludes_item_zero_and_seen_items() -> None:
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.9, 0.2], [9.0, 0.8, 0.7, 0.6, 0.5]])
    indptr, indices = np.array([0, 1, 3]), np.array([3, 1, 2])
    idx, vals = top_k(scores, 2, indptr, indices)
    assert idx.tolist() == [[2, 4], [3, 4]]
    np.testing.assert_allclose(vals, [[0.5, 0.2], [0.6, 0.5]])
    assert idx.dtype == np.int64 and vals.dtype == np.float32


def test_top_k_ties_break_to_lower_index_and_pad_when_short() -> None:
    scores = torch.tensor([[1.0, 0.5, 0.7, 0.5, 0.7, 0.5]])
    idx, _ = top_k(scores, 4)
    assert idx.tolist() == [[2, 4, 1, 3]]
    idx, vals = top_k(scores, 8, np.array([0, 2]), np.array([2, 3]))
    assert idx.tolist() == [[4, 1, 5, -1, -1, -1, -1, -1]]
    assert np.isnan(vals[0, 3:]).all() and not np.isnan(vals[0, :3]).any()


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 4),
    n=st.integers(1, 12),
    k=st.integers(0, 14),
    seed=st.integers(0, 10_000),
)
def test_top_k_matches_reference_on_tie_heavy_scores(m: int, n: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.choice([-1.0, -0.0, 0.0, 0.25, 0.5, -np.inf, np.inf], size=(m, n))
    scores = scores.astype(np.float32)
    excluded = [
        set(rng.choice(n, size=rng.integers(0, n + 1), replace=False).tolist()) for _ in range(m)
    ]
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])])
    indices = np.array([j for e in excluded for j in sorted(e)], dtype=np.int64)
    idx, vals = top_k(torch.from_numpy(scores), k, indptr, indices)
    assert idx.shape == vals.shape == (m, k)
    assert idx.tolist() == _reference_top_k(scores, k, excluded)
    real = idx >= 0
    np.testing.assert_array_equal(vals[real], scores[np.nonzero(real)[0], idx[real]])


def test_top_k_rejects_malformed_csr() -> None:
    scores = torch.zeros(2, 4)
    with pytest.raises(ValueError):
        top_k(scores, 2, np.array([0, 1]), np.array([1]))
    with pytest.raises(ValueError):
        top_k(scores, 2, np.array([0, 1, 1]), np.array([7]))
    with pytest.raises(ValueError):
        top_k(scores, 2, np.array([0, 1, 1]), None)


def test_similar_items_on_hand_built_embeddings() -> None:
    emb = torch.tensor(
        [
            [5.0, 5.0],  # 0: unknown token; would be the best match for item 3 if not excluded
            [1.0, 0.0],
            [10.0, 1.0],  # nearly parallel to 1, much longer (cosine ignores length)
            [1.0, 1.0],
            [0.0, 1.0],
            [-1.0, 0.0],
        ]
    )
    idx, sims = similar_items(emb, torch.tensor([1, 3]), 3)
    assert idx.tolist() == [[2, 3, 4], [2, 1, 4]]  # item 3: 1 and 4 tie, lower index first
    np.testing.assert_allclose(sims[0], [10 / math.sqrt(101), 1 / math.sqrt(2), 0.0], atol=1e-6)
    np.testing.assert_allclose(sims[1], [11 / math.sqrt(202), 1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_item_factors_and_biases() -> None:
    dot, nn_model = DotProductBias(3, 6, n_factors=2), EmbeddingNN(3, 6, item_sz=4)
    assert item_factors(dot).shape == (6, 2) and item_factors(nn_model).shape == (6, 4)
    assert item_biases(dot).shape == (6,) and item_biases(nn_model) is None
    assert not item_factors(dot).requires_grad


def _synthetic_ratings(seed: int = 0):
    rng = np.random.default_rng(seed)
    n_users, n_items, n = 120, 80, 6000
    uf, itf = rng.normal(size=(n_users, 3)), rng.normal(size=(n_items, 3))
    ub, ib = rng.normal(0, 0.4, n_users), rng.normal(0, 0.4, n_items)
    u = rng.integers(1, n_users, n)
    i = rng.integers(1, n_items, n)
    r = 3.0 + (uf[u] * itf[i]).sum(1) * 0.5 + ub[u] + ib[i] + rng.normal(0, 0.2, n)
    r = np.clip(r, 0.5, 5.0).astype(np.float32)
    return n_users, n_items, torch.as_tensor(u), torch.as_tensor(i), torch.as_tensor(r)


@pytest.mark.parametrize(
    ("make", "lr", "wd", "epochs"),
    [
        (lambda nu, ni: DotProductBias(nu, ni, n_factors=8), 2e-2, 1e-2, 30),
        (lambda nu, ni: EmbeddingNN(nu, ni, 16, 16, layers=(64,), ps=0.0), 5e-3, 1e-2, 30),
    ],
    ids=["dot", "nn"],
)
def test_models_learn_synthetic_ratings(
    one_thread, make, lr: float, wd: float, epochs: int
) -> None:
    torch.manual_seed(0)
    n_users, n_items, u, i, r = _synthetic_ratings()
    n_tr = 5000
    model = make(n_users, n_items)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    for _ in range(epochs):
        for idx in torch.randperm(n_tr).split(256):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(u[idx], i[idx]), r[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(u[n_tr:], i[n_tr:])
    rmse = torch.sqrt(((pred - r[n_tr:]) ** 2).mean()).item()
    baseline = torch.sqrt(((r[:n_tr].mean() - r[n_tr:]) ** 2).mean()).item()
    assert rmse < 0.5 * baseline, (rmse, baseline)
