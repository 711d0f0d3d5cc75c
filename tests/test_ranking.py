"""The ranking head (modeling.ranking): objectives, dedup, the held-out top-k protocol, MAP,
the cold-start rating rule and the per-user stratified split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from modeling.baselines import BiasBaseline, cold_start_fill
from modeling.collab import DotProductBias
from modeling.metrics import map_at_k, ranking_report
from modeling.ranking import (
    BPR,
    CatalogSoftmax,
    HoldoutTopK,
    build_ranking_head,
    popularity,
    ranking_task,
    unique_pairs,
)
from modeling.training import Trainer
from pipelines.jobs.ratings_eval import split_ratings, user_stratified
from pipelines.synth import synth_ratings


# ---------------------------------------------------------------- network and objectives
def test_dot_forward_scores_pairs_candidates_and_the_whole_catalogue():
    torch.manual_seed(0)
    m = DotProductBias(5, 7, 4, y_range=None)
    with torch.no_grad():
        m.user_bias.weight.normal_()
        m.item_bias.weight.normal_()
    users = torch.tensor([1, 3, 4])
    every = m(users)
    assert every.shape == (3, 7)
    pairs = m(users.repeat_interleave(7), torch.arange(7).repeat(3)).view(3, 7)
    torch.testing.assert_close(every, pairs)
    cand = torch.tensor([[0, 2], [6, 6], [1, 5]])
    torch.testing.assert_close(m(users, cand), torch.gather(every, 1, cand))
    torch.testing.assert_close(m.score_all(users), every)


def test_catalog_softmax_is_the_mean_negative_log_softmax_over_positives():
    torch.manual_seed(1)
    m = DotProductBias(4, 6, 3, y_range=None)
    # baskets: user 1 -> items {1, 4}, user 3 -> {2}, user 2 -> {5, 3, 1}
    indptr, indices = np.array([0, 2, 3, 6]), np.array([1, 4, 2, 5, 3, 1])
    obj = CatalogSoftmax(indptr, indices)
    obj.start(0, torch.device("cpu"))
    users, rows = torch.tensor([1, 3, 2]), torch.tensor([0, 1, 2])
    loss = obj(m, (users,), rows)
    logp = torch.log_softmax(m(users)[:, 1:], dim=1)  # item 0 (unknown) is not in the softmax
    want = -(logp[0, 0] + logp[0, 3] + logp[1, 1] + logp[2, 4] + logp[2, 2] + logp[2, 0]) / 6
    torch.testing.assert_close(loss, want)
    # a subset of the baskets: rows index the CSR, whatever the order
    torch.testing.assert_close(obj(m, (users[[2]],), rows[[2]]), -(logp[2, 4] + logp[2, 2] + logp[2, 0]) / 3)


def test_bpr_draws_seeded_negatives_from_known_items():
    m = build_ranking_head(6, 9, 4)
    seen: list[torch.Tensor] = []

    def spy(users, items):
        seen.append(items.clone())
        return m(users, items)

    obj = BPR(9, n_negatives=3)
    xs = (torch.tensor([1, 2, 5, 5]), torch.tensor([3, 4, 8, 1]))
    losses = []
    for _ in range(2):
        obj.start(7, torch.device("cpu"))
        losses.append(obj(spy, xs, torch.zeros(4)))
    torch.testing.assert_close(losses[0], losses[1])
    assert torch.equal(seen[0], seen[1])
    assert seen[0].shape == (4, 4) and torch.equal(seen[0][:, 0], xs[1])
    assert int(seen[0][:, 1:].min()) >= 1 and int(seen[0][:, 1:].max()) <= 8
    obj.start(8, torch.device("cpu"))
    obj(spy, xs, torch.zeros(4))
    assert not torch.equal(seen[2], seen[0])
    with pytest.raises(ValueError):
        BPR(1)


# ---------------------------------------------------------------- data
def test_duplicate_interactions_count_once():
    u = np.array([2, 1, 2, 2, 1, 3])
    i = np.array([5, 4, 5, 1, 4, 2])
    uu, ii = unique_pairs(u, i)
    assert list(zip(uu.tolist(), ii.tolist(), strict=True)) == [(1, 4), (2, 1), (2, 5), (3, 2)]
    once = ranking_task("softmax", uu, ii, 4, 6)
    twice = ranking_task("softmax", u, i, 4, 6)
    assert torch.equal(once.train.xs[0], twice.train.xs[0])
    assert np.array_equal(once.objective.indices.numpy(), twice.objective.indices.numpy())
    assert len(ranking_task("bpr", u, i, 4, 6).train) == 4
    # unknown codes (0) never train
    assert len(ranking_task("bpr", np.array([0, 1, 1]), np.array([3, 0, 2]), 2, 4).train) == 1
    for loss in ("softmax", "bpr"):
        with pytest.raises(ValueError, match="no \\(user, item\\)"):
            ranking_task(loss, np.array([0, 1]), np.array([3, 0]), 2, 4)


def test_popularity_counts_items_and_never_ranks_the_unknown_token():
    assert popularity(np.array([1, 1, 3, 0]), 5).tolist() == [0.0, 2.0, 0.0, 1.0, 0.0]


# ---------------------------------------------------------------- learning
def _fit_head(df: pd.DataFrame, seed: int, factors: int = 32, epochs: int = 20) -> tuple[
        torch.nn.Module, HoldoutTopK, np.ndarray]:
    tr, va = split_ratings(df, 0.25, "user-stratified", seed=0)
    n_users, n_items = int(df["user"].max()) + 1, int(df["item"].max()) + 1
    tu, ti = tr["user"].to_numpy(np.int64), tr["item"].to_numpy(np.int64)
    vu, vi = va["user"].to_numpy(np.int64), va["item"].to_numpy(np.int64)
    task = ranking_task("softmax", tu, ti, n_users, n_items)
    torch.manual_seed(seed)
    head = build_ranking_head(n_users, n_items, factors)
    Trainer(head, lr=2e-2, wd=1.0, batch_size=128, seed=seed, quiet=True, objective=task.objective).fit(
        task.train, None, epochs=epochs)
    holdout = HoldoutTopK.build(tu, ti, vu, vi, n_users, n_items)
    return head.eval(), holdout, popularity(unique_pairs(tu, ti)[1], n_items)


def test_ranking_head_beats_popularity_where_taste_decides():
    # choice > 0: users pick items by taste as well as popularity (with choice=0 popularity is
    # all there is to learn, and no personal model beats it)
    ratings, _ = synth_ratings(users=943, items=1682, ratings=60_000, seed=3, choice=4.0)
    head, holdout, pop = _fit_head(ratings, seed=0)
    ours = holdout.report(head, 10)
    base = holdout.report_scores(pop, 10)
    assert ours["precision_at_10"] > 1.15 * base["precision_at_10"], (ours, base)
    assert ours["ndcg_at_10"] > 1.15 * base["ndcg_at_10"]
    assert ours["coverage_at_10"] > 2 * base["coverage_at_10"]


def test_ranking_head_training_is_seeded():
    ratings, _ = synth_ratings(users=100, items=80, ratings=3_000, seed=3, choice=4.0)
    first, _, _ = _fit_head(ratings, seed=0, factors=8, epochs=3)
    again, _, _ = _fit_head(ratings, seed=0, factors=8, epochs=3)
    other, _, _ = _fit_head(ratings, seed=1, factors=8, epochs=3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                  strict=True))
    assert not torch.equal(first.item_emb.weight, other.item_emb.weight)


def test_bpr_head_learns_too():
    ratings, _ = synth_ratings(users=300, items=200, ratings=15_000, seed=4, choice=4.0)
    tr, va = split_ratings(ratings, 0.25, "user-stratified", seed=0)
    n_users, n_items = int(ratings["user"].max()) + 1, int(ratings["item"].max()) + 1
    task = ranking_task("bpr", tr["user"].to_numpy(), tr["item"].to_numpy(), n_users, n_items,
                        va["user"].to_numpy(), va["item"].to_numpy(), n_negatives=2)
    torch.manual_seed(0)
    head = build_ranking_head(n_users, n_items, 16)
    hist = Trainer(head, lr=1e-2, wd=0.1, batch_size=512, seed=0, quiet=True, objective=task.objective).fit(
        task.train, task.valid, epochs=8)
    losses = hist.series("valid_loss")
    assert losses[-1] < min(losses[0], np.log(2)) - 0.02  # a random ranker scores log 2
    holdout = HoldoutTopK.build(tr["user"].to_numpy(), tr["item"].to_numpy(), va["user"].to_numpy(),
                                va["item"].to_numpy(), n_users, n_items)
    assert holdout.report(head.eval(), 10)["precision_at_10"] > \
        holdout.report_scores(np.random.default_rng(0).random(n_items), 10)["precision_at_10"]


# ---------------------------------------------------------------- protocol and metrics
def test_holdout_protocol_every_heldout_item_relevant_training_items_excluded():
    # 2 users, items 1..5; user 1 trained on {1, 2}, held out {3, 0 (an item unknown in training)}
    tu, ti = np.array([1, 1, 2]), np.array([1, 2, 5])
    vu, vi = np.array([1, 1, 2, 0]), np.array([3, 0, 4, 2])
    h = HoldoutTopK.build(tu, ti, vu, vi, n_users=3, n_items=6)
    assert h.users.tolist() == [1, 2]  # the unknown user (0) is left out
    scores = np.array([0.0, 9, 8, 1, 5, 7], dtype=np.float32)  # same ranking for everyone
    rep = h.report_scores(scores, k=2)
    # user 1: seen {1, 2} excluded -> top-2 = [5, 4]: no hit of {3, unknown}; user 2: seen {5} -> [1, 2]: no hit
    assert rep["precision_at_2"] == 0.0
    rep3 = h.report_scores(scores, k=3)
    # user 1 -> [5, 4, 3]: one hit of 2 relevant; user 2 -> [1, 2, 4]: one hit of 1 relevant
    assert rep3["precision_at_3"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert rep3["recall_at_3"] == pytest.approx((1 / 2 + 1) / 2)
    assert rep3["coverage_at_3"] == pytest.approx(len({5, 4, 3, 1, 2}) / 5)


def test_map_at_k_hand_case():
    rec = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    rel = (np.array([0, 2, 3, 3]), np.array([1, 3, 6]))  # user 2 has none (left out of the mean)
    # user 0: hits at 1 and 3 -> (1/1 + 2/3) / min(3, 2); user 1: hit at 3 -> (1/3) / 1
    assert map_at_k(rec, rel, 3) == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)
    rep = ranking_report(rec, rel, 3, n_items=20, prefix="x_")
    assert set(rep) == {"x_precision_at_3", "x_recall_at_3", "x_ndcg_at_3", "x_map_at_3", "x_coverage_at_3"}
    assert rep["x_coverage_at_3"] == pytest.approx(9 / 20)


# ---------------------------------------------------------------- cold start
def test_cold_start_fill_answers_unknown_rows_with_mean_plus_the_known_bias():
    base = BiasBaseline(3.5, np.array([0.0, 0.4, -0.3]), np.array([0.0, 0.2, -0.5, 1.5]))
    pred = np.array([4.1, 2.2, 3.3, 1.0, 4.9])
    users = np.array([1, 0, 2, 0, 2])
    items = np.array([2, 1, 0, 0, 3])
    out = cold_start_fill(pred, users, items, base, scale=(1.0, 5.0))
    assert out.tolist() == pytest.approx([4.1, 3.5 + 0.2, 3.5 - 0.3, 3.5, 4.9])
    assert pred.tolist() == [4.1, 2.2, 3.3, 1.0, 4.9]  # not modified in place
    hot = BiasBaseline(4.8, np.array([0.0]), np.array([0.0, 0.5]))
    assert cold_start_fill(np.array([1.0]), np.array([0]), np.array([1]), hot, scale=(1.0, 5.0)).tolist() == [5.0]


# ---------------------------------------------------------------- split
def test_user_stratified_split_holds_out_that_fraction_of_every_user():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 40, 60)
    users = np.repeat(np.arange(60).astype(str), counts)
    df = pd.DataFrame({"user": users, "item": rng.integers(0, 500, len(users)).astype(str),
                       "rating": 3.0, "timestamp": np.arange(len(users))})
    tr, va = split_ratings(df, 0.25, "user-stratified", seed=5)
    assert len(tr) + len(va) == len(df)
    per_user = va.groupby("user").size().reindex(np.arange(60).astype(str), fill_value=0)
    assert (per_user.to_numpy() == np.round(counts * 0.25)).all()
    assert set(tr["user"]) == set(users)  # every user keeps training rows
    mask = user_stratified(users, 0.25, seed=5)
    assert np.array_equal(mask, user_stratified(users, 0.25, seed=5))
    assert not np.array_equal(mask, user_stratified(users, 0.25, seed=6))
