"""The ranking head's epochs and popularity prior, chosen on an inner split of the training pairs
(modeling.ranking_select): the inner split, the folded scorer, and the job end to end (the
default head never ranks below popularity on popularity-driven data and still beats it where
taste decides; the choice is in the bundle; batch, HTTP and the predictor answer alike)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from modeling.bundle import BUNDLE_JSON, RankingChoice, RatingsSpec, read_spec, resolve_bundle_dir
from modeling.collab import score_all_items
from modeling.predictors import RatingsPredictor, load_predictor
from modeling.ranking import HoldoutTopK, build_ranking_head
from modeling.ranking_select import (
    PriorSearch,
    Scored,
    choose,
    inner_split,
    log_popularity,
    pooled,
    with_prior,
)
from pipelines.batch import recommend_file
from pipelines.jobs.ratings import RatingsConfig, prepare, train_ratings
from pipelines.synth import write_ratings
from service import Settings, create_app


# ---------------------------------------------------------------- units
def test_inner_split_holds_out_a_tenth_of_each_users_pairs_seeded():
    rng = np.random.default_rng(0)
    counts = np.array([3, 4, 5, 9, 10, 25, 100])
    users = np.repeat(np.arange(1, len(counts) + 1), counts)
    users = users[rng.permutation(len(users))]
    hold = inner_split(users, frac=0.1, seed=1)
    per_user = np.bincount(users[hold], minlength=len(counts) + 1)[1:]
    assert per_user.tolist() == [0, 0, 1, 1, 1, 2, 10]  # < 5 positives: none; else max(1, floor(10%))
    assert np.array_equal(hold, inner_split(users, frac=0.1, seed=1))
    assert not np.array_equal(hold, inner_split(users, frac=0.1, seed=2))


def test_with_prior_folds_the_popularity_prior_into_the_head():
    torch.manual_seed(0)
    head = build_ranking_head(20, 30, 8).eval()
    log_pop = np.log1p(np.random.default_rng(0).integers(0, 50, 30)).astype(np.float32)
    log_pop[0] = 0.0
    users = torch.arange(1, 20)
    raw = score_all_items(head, users)
    mixed = score_all_items(with_prior(head, log_pop, 1.0, 0.5), users)
    torch.testing.assert_close(mixed, raw + 0.5 * torch.from_numpy(log_pop), rtol=1e-5, atol=1e-5)
    pop_only = with_prior(head, log_pop, 0.0, 1.0)
    torch.testing.assert_close(score_all_items(pop_only, users), torch.from_numpy(log_pop).expand(19, 30))
    assert torch.equal(pop_only.item_emb.weight, head.item_emb.weight)  # similar items keep the head's factors
    assert torch.equal(score_all_items(head, users), raw)  # the head itself is left as it was


def test_choose_falls_back_to_popularity_unless_the_head_is_clearly_better():
    pop = Scored(5, 0.0, 1.0, np.full(400, 0.2))
    edge = pop.precision.copy()
    edge[:3] += 0.1  # ahead on 3 users of 400: within two standard errors of the paired difference
    table = [pop, Scored(10, 1.0, 0.5, edge)]
    within = choose(table, 30, 400, 1000)
    assert (within.head_weight, within.beta, within.epochs) == (0.0, 1.0, 10)
    assert within.inner_precision == within.inner_pop_precision == pytest.approx(0.2)
    assert 0 < within.inner_t < 2
    clear = pop.precision.copy()
    clear[:200] += 0.1
    table.append(Scored(20, 1.0, 0.25, clear))
    chosen = choose(table, 30, 400, 1000, folds=2)
    assert (chosen.head_weight, chosen.beta, chosen.epochs, chosen.schedule_epochs) == (1.0, 0.25, 20, 30)
    assert chosen.inner_precision == pytest.approx(0.25) and chosen.inner_pop_precision == pytest.approx(0.2)
    assert (chosen.inner_users, chosen.inner_pairs, chosen.inner_folds) == (400, 1000, 2) and chosen.inner_t > 2
    # several inner splits: per user, the mean over the splits of each setting
    other = [Scored(5, 0.0, 1.0, np.full(400, 0.4)), Scored(10, 1.0, 0.5, np.zeros(400))]
    both = pooled([table[:2], other])
    assert [(r.epoch, r.head_weight, r.beta) for r in both] == [(5, 0.0, 1.0), (10, 1.0, 0.5)]
    np.testing.assert_allclose(both[0].precision, 0.3)
    np.testing.assert_allclose(both[1].precision, edge / 2)


def test_prior_search_scores_the_inner_holdout_for_every_grid_entry():
    torch.manual_seed(0)
    n_users, n_items = 6, 12
    head = build_ranking_head(n_users, n_items, 4).eval()
    seen = (np.array([0, 0, 2, 4, 6, 8, 10]), np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
    relevant = (np.array([0, 0, 1, 2, 3, 4, 5]), np.array([11, 10, 9, 8, 7]))
    log_pop = np.log1p(np.arange(n_items, dtype=np.float32))
    search = PriorSearch(seen, relevant, log_pop, at_epochs=[1], grid=[(0.0, 1.0)], k=2)
    [(w, b, precision)] = search.evaluate(head)
    # popularity alone ranks items 11, 10, 9, ... minus each user's seen items
    assert (w, b) == (0.0, 1.0)
    assert precision.tolist() == [0.5, 0.5, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def store(fresh_module_store: Path) -> Path:
    """A module-wide sqlite MLflow store as the working directory and tracking URI."""
    return fresh_module_store


def _cfg(path: Path, **kw: object) -> RatingsConfig:
    # the rating model short; the ranking head with its defaults (the subject here)
    base = dict(ratings=str(path), epochs=2, seed=0, quiet=True)
    base.update(kw)
    return RatingsConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def popular(store: Path) -> dict:
    """The demo generator (choices by popularity alone), small; the default head trained on it."""
    files = write_ratings(store / "popular", users=300, items=400, ratings=20_000, seed=0)
    cfg = _cfg(files["u.data"])
    return {"files": files, "cfg": cfg, "result": train_ratings(cfg)}


def test_default_head_never_ranks_below_popularity_on_popularity_driven_data(popular):
    m = popular["result"]["metrics"]
    # before the inner-split choice the default head lost here (P@10 0.308 against 0.359)
    assert m["precision_at_10"] >= m["pop_precision_at_10"] > 0.2
    assert m["ndcg_at_10"] >= m["pop_ndcg_at_10"] - 1e-9
    for key in ("ranking_epochs_chosen", "ranking_prior_beta", "ranking_head_weight",
                "ranking_inner_precision_at_10", "ranking_inner_pop_precision_at_10"):
        assert key in m and np.isfinite(m[key]), key
    run = mlflow.get_run(popular["result"]["run_id"])
    assert run.data.metrics["ranking_prior_beta"] == m["ranking_prior_beta"]
    assert run.data.metrics["ranking_epochs_chosen"] == m["ranking_epochs_chosen"]


def test_default_head_beats_popularity_where_taste_decides(store):
    files = write_ratings(store / "taste", users=300, items=400, ratings=20_000, seed=1, choice=4.0)
    m = train_ratings(_cfg(files["u.data"]))["metrics"]
    assert m["ranking_head_weight"] == 1.0
    assert m["precision_at_10"] > 1.1 * m["pop_precision_at_10"], m
    assert m["ranking_inner_precision_at_10"] > m["ranking_inner_pop_precision_at_10"]


def test_choice_is_in_the_bundle_and_the_served_ranker_is_what_was_measured(popular):
    res, cfg = popular["result"], popular["cfg"]
    bundle = resolve_bundle_dir(res["model_uri"])
    pred = load_predictor(str(bundle))
    assert isinstance(pred, RatingsPredictor)
    choice = pred.spec.ranking_choice
    assert isinstance(choice, RankingChoice)
    m = res["metrics"]
    assert (choice.epochs, choice.beta, choice.head_weight) == (
        m["ranking_epochs_chosen"], m["ranking_prior_beta"], m["ranking_head_weight"])
    assert choice.schedule_epochs == cfg.ranking_epochs == 30 and 1 <= choice.epochs <= 30
    assert choice.inner_users > 0 and choice.inner_pairs > 0 and 1 <= choice.inner_folds <= 5
    doc = json.loads((bundle / BUNDLE_JSON).read_text())
    assert doc["ranking_choice"]["beta"] == choice.beta
    again = RatingsSpec.from_doc(json.loads(json.dumps(pred.spec.to_doc())), "round trip")
    assert again.ranking_choice == choice and read_spec(bundle).ranking_choice == choice  # type: ignore[attr-defined]
    # the loaded ranker reproduces the run's held-out figure on the same split
    d = prepare(RatingsConfig(**{**cfg.__dict__}))
    holdout = HoldoutTopK.build(d.tu, d.ti, d.vu, d.vi, d.n_users, d.n_items, cfg.eval_users, cfg.seed)
    assert holdout.report(pred.ranker, 10)["precision_at_10"] == pytest.approx(m["precision_at_10"], abs=1e-12)
    if choice.head_weight == 0.0:  # popularity alone: the ranker scores log(1 + training popularity)
        users = torch.arange(1, 6)
        expect = torch.from_numpy(log_popularity(d.ti, d.n_items) * choice.beta).expand(5, -1)
        torch.testing.assert_close(score_all_items(pred.ranker, users), expect)


def test_batch_http_and_predictor_recommend_alike(popular, store):
    res = popular["result"]
    pred = load_predictor(str(resolve_bundle_dir(res["model_uri"])))
    users = [str(u) for u in pred.users[:25]] + ["stranger"]
    (store / "users.txt").write_text("\n".join(users) + "\n")
    recommend_file(res["model_uri"], store / "rec.parquet", users=store / "users.txt", k=7, quiet=True, track=False)
    table = pq.read_table(store / "rec.parquet").to_pandas()
    expect = pred.recommend(users, k=7)
    got = {u: g.sort_values("rank") for u, g in table.groupby("user")}
    for answer in expect:
        rows = got[answer["user"]]
        assert rows["item"].tolist() == [i["item"] for i in answer["items"]]
        np.testing.assert_allclose(rows["score"], [i["score"] for i in answer["items"]], rtol=1e-6)
        assert rows["cold_start"].all() == answer["cold_start"]
    item = str(pred.items[3])
    with TestClient(create_app(Settings(models={"r": res["model_uri"]},
                                        tracking_uri=os.environ["MLFLOW_TRACKING_URI"]))) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for answer in expect[:5] + expect[-1:]:
            body = client.get(f"/v1/models/r/users/{answer['user']}/recommendations", params={"k": 7}).json()
            assert [i["item"] for i in body["items"]] == [i["item"] for i in answer["items"]]
            np.testing.assert_allclose([i["score"] for i in body["items"]], [i["score"] for i in answer["items"]],
                                       rtol=1e-6)
        sim = client.get(f"/v1/models/r/items/{item}/similar", params={"k": 5}).json()
    assert [i["item"] for i in sim["items"]] == [i["item"] for i in pred.similar(item, k=5)]
