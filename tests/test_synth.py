"""Tests for the seeded demo-data generators (Rossmann-schema sales, MovieLens-format ratings)."""

from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from modeling.errors import DataError
from pipelines.synth import (
    GENRES,
    synth_ratings,
    synth_rossmann,
    write_ratings,
    write_rossmann,
)

# The Kaggle files' headers, verbatim (R-style quoting).
KAGGLE_TRAIN_HEADER = ('"Store","DayOfWeek","Date","Sales","Customers","Open","Promo",'
                       '"StateHoliday","SchoolHoliday"')
KAGGLE_STORE_HEADER = ('"Store","StoreType","Assortment","CompetitionDistance",'
                       '"CompetitionOpenSinceMonth","CompetitionOpenSinceYear","Promo2",'
                       '"Promo2SinceWeek","Promo2SinceYear","PromoInterval"')
KAGGLE_TEST_HEADER = ('"Id","Store","DayOfWeek","Date","Open","Promo","StateHoliday",'
                      '"SchoolHoliday"')


@pytest.fixture(scope="module")
def rossmann() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return synth_rossmann(stores=40, days=500, seed=7)


@pytest.fixture(scope="module")
def big_store() -> pd.DataFrame:
    return synth_rossmann(stores=600, days=30, seed=1)[1]


# ---------------------------------------------------------------- Rossmann
def test_rossmann_same_seed_same_frames_other_seed_differs() -> None:
    a = synth_rossmann(stores=6, days=90, seed=3)
    b = synth_rossmann(stores=6, days=90, seed=3)
    c = synth_rossmann(stores=6, days=90, seed=4)
    for x, y in zip(a, b, strict=True):
        pd.testing.assert_frame_equal(x, y)
    assert not a[0]["Sales"].equals(c[0]["Sales"])
    assert not a[1].equals(c[1])


def test_write_rossmann_is_byte_identical_and_leaves_no_temp_files(tmp_path) -> None:
    p1 = write_rossmann(tmp_path / "one", stores=5, days=70, seed=11)
    p2 = write_rossmann(tmp_path / "two", stores=5, days=70, seed=11)
    assert set(p1) == {"train.csv", "store.csv", "test.csv"}
    for name in p1:
        assert p1[name].read_bytes() == p2[name].read_bytes()
    assert sorted(f.name for f in (tmp_path / "one").iterdir()) == sorted(p1)


def test_written_files_use_kaggle_headers_quoting_and_dtypes(tmp_path) -> None:
    paths = write_rossmann(tmp_path, stores=5, days=70, seed=2)
    lines = {n: p.read_text().splitlines() for n, p in paths.items()}
    assert lines["train.csv"][0] == KAGGLE_TRAIN_HEADER
    assert lines["store.csv"][0] == KAGGLE_STORE_HEADER
    assert lines["test.csv"][0] == KAGGLE_TEST_HEADER
    # e.g. 1,3,2014-12-31,4496,528,1,0,"0","1": date bare, holiday flags quoted
    assert re.fullmatch(r'\d+,[1-7],\d{4}-\d\d-\d\d,\d+,\d+,[01],[01],"[0abc]","[01]"',
                        lines["train.csv"][1])
    assert any(line.endswith(',,,""') for line in lines["store.csv"])  # Promo2 == 0 rows

    train = pd.read_csv(paths["train.csv"])
    assert train.dtypes.astype(str).to_dict() == {
        "Store": "int64", "DayOfWeek": "int64", "Date": "object", "Sales": "int64",
        "Customers": "int64", "Open": "int64", "Promo": "int64", "StateHoliday": "object",
        "SchoolHoliday": "int64"}
    store = pd.read_csv(paths["store.csv"])
    assert store["StoreType"].isin(list("abcd")).all()
    assert store["Assortment"].isin(list("abc")).all()
    test = pd.read_csv(paths["test.csv"])
    assert list(test.columns) == KAGGLE_TEST_HEADER.replace('"', "").split(",")


def test_frames_round_trip_through_the_written_csv(tmp_path) -> None:
    frames = dict(zip(["train.csv", "store.csv", "test.csv"],
                      synth_rossmann(stores=5, days=70, seed=2), strict=True))
    paths = write_rossmann(tmp_path, stores=5, days=70, seed=2)
    for name, frame in frames.items():
        pd.testing.assert_frame_equal(pd.read_csv(paths[name]), frame.reset_index(drop=True))


def test_rows_sorted_like_kaggle_and_calendar_consistent(rossmann) -> None:
    train, _, test = rossmann
    for df in (train, test):
        expected = df.sort_values(["Date", "Store"], ascending=[False, True], kind="stable")
        assert df.index.equals(expected.index)
        dates = pd.to_datetime(df["Date"], format="%Y-%m-%d")
        assert (dates.dt.dayofweek + 1 == df["DayOfWeek"]).all()
        assert df["StateHoliday"].isin(["0", "a", "b", "c"]).all()
        assert df.groupby("Date")["Store"].nunique().eq(40).all()   # a full panel
    days = pd.to_datetime(train["Date"]).drop_duplicates().sort_values()
    assert days.iloc[0] == pd.Timestamp("2013-01-01") and len(days) == 500
    assert (days.diff().dropna() == pd.Timedelta(days=1)).all()


def test_test_period_is_the_48_days_after_training(rossmann) -> None:
    train, _, test = rossmann
    last = pd.to_datetime(train["Date"]).max()
    test_days = pd.to_datetime(test["Date"]).drop_duplicates().sort_values().reset_index(drop=True)
    expected = pd.Series(pd.date_range(last + pd.Timedelta(days=1), periods=48))
    pd.testing.assert_series_equal(test_days, expected, check_names=False)
    assert (test["Id"].to_numpy() == np.arange(1, len(test) + 1)).all()
    assert 0 < test["Open"].isna().sum() <= 11          # a few missing Open, as in Kaggle
    assert test.loc[test["Open"].isna(), "Store"].nunique() == 1


def test_closed_days_have_zero_sales_and_open_days_positive(rossmann) -> None:
    train = rossmann[0]
    closed = train["Open"] == 0
    assert (train.loc[closed, ["Sales", "Customers"]] == 0).all().all()
    assert (train.loc[~closed, "Sales"] > 0).all()
    sunday = train[train["DayOfWeek"] == 7]
    assert 0 < sunday["Open"].mean() < 0.15           # most stores closed, a few open
    holiday = train[train["StateHoliday"] != "0"]
    assert len(holiday) > 0 and holiday["Open"].mean() < 0.1


def test_promo_is_chainwide_on_weekdays_in_blocks(rossmann) -> None:
    train = rossmann[0]
    assert train.groupby("Date")["Promo"].nunique().eq(1).all()
    assert (train.loc[train["DayOfWeek"] >= 6, "Promo"] == 0).all()
    daily = train.groupby("Date")["Promo"].first().sort_index()
    weekday = pd.to_datetime(daily.index).dayofweek < 5
    assert 0.35 < daily[weekday].mean() < 0.7
    runs = (daily[weekday].diff().fillna(0) != 0).sum()     # long runs, not daily flips
    assert runs < weekday.sum() / 3


def test_store_missing_value_pattern(big_store) -> None:
    s = big_store
    no_p2 = s["Promo2"] == 0
    for col in ("Promo2SinceWeek", "Promo2SinceYear", "PromoInterval"):
        assert s[col].isna().equals(no_p2), col
    assert set(s["PromoInterval"].dropna()) <= {"Jan,Apr,Jul,Oct", "Feb,May,Aug,Nov",
                                                  "Mar,Jun,Sept,Dec"}
    assert s["CompetitionOpenSinceMonth"].isna().equals(s["CompetitionOpenSinceYear"].isna())
    assert 0.2 < s["CompetitionOpenSinceMonth"].isna().mean() < 0.4
    assert 1 <= s["CompetitionDistance"].isna().sum() <= 0.02 * len(s)
    assert s["CompetitionOpenSinceMonth"].dropna().between(1, 12).all()
    assert s["Promo2SinceWeek"].dropna().between(1, 52).all()
    assert 0.3 < s["Promo2"].mean() < 0.7


def test_sales_have_learnable_structure(rossmann) -> None:
    """OLS on log sales with store, weekday, promo and December terms explains most variance."""
    train = rossmann[0]
    o = train[train["Open"] == 1]
    y = np.log(o["Sales"].to_numpy(float))
    x = np.column_stack([
        pd.get_dummies(o["Store"]).to_numpy(float),
        pd.get_dummies(o["DayOfWeek"], drop_first=True).to_numpy(float),
        o["Promo"].to_numpy(float),
        (o["Date"].str[5:7] == "12").to_numpy(float),
    ])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    promo, december = coef[-2], coef[-1]
    assert 0.15 < promo < 0.32                      # ~ +20-30% promo uplift
    assert december > 0.05                          # December peak
    assert resid.std() < 0.6 * y.std()
    assert np.corrcoef(o["Sales"], o["Customers"])[0, 1] > 0.8


def test_rossmann_rejects_bad_sizes() -> None:
    with pytest.raises(DataError):
        synth_rossmann(stores=0)


# ---------------------------------------------------------------- ratings
def _bias_fit(u, i, r, nu, ni, lam=5.0, iters=10):
    mu, bu, bi = r.mean(), np.zeros(nu), np.zeros(ni)
    for _ in range(iters):
        bu = np.bincount(u, r - mu - bi[i], nu) / (np.bincount(u, minlength=nu) + lam)
        bi = np.bincount(i, r - mu - bu[u], ni) / (np.bincount(i, minlength=ni) + lam)
    return mu, bu, bi


def _als_residual_fit(u, i, res, nu, ni, k=8, lam=3.0, iters=12):
    """Ridge ALS on bias residuals; Gram matrices via sparse products (no per-user loop)."""
    rng = np.random.default_rng(0)
    p, q = rng.normal(0, 0.1, (nu, k)), rng.normal(0, 0.1, (ni, k))

    def solve(rows, cols, other, n):
        x = other[cols]
        s = sp.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), (n, len(rows)))
        gram = (s @ (x[:, :, None] * x[:, None, :]).reshape(len(rows), -1)).reshape(n, k, k)
        rhs = s @ (x * res[:, None])
        return np.linalg.solve(gram + lam * np.eye(k), rhs[..., None])[..., 0]

    for _ in range(iters):
        p = solve(u, i, q, nu)
        q = solve(i, u, p, ni)
    return p, q


def test_ratings_same_seed_same_frames_other_seed_differs() -> None:
    a = synth_ratings(users=60, items=80, ratings=1500, seed=5)
    b = synth_ratings(users=60, items=80, ratings=1500, seed=5)
    c = synth_ratings(users=60, items=80, ratings=1500, seed=6)
    for x, y in zip(a, b, strict=True):
        pd.testing.assert_frame_equal(x, y)
    assert not a[0].equals(c[0])


def test_ratings_constraints() -> None:
    ratings, movies = synth_ratings(users=300, items=400, ratings=20_000, seed=1)
    assert list(ratings.columns) == ["user", "item", "rating", "timestamp"]
    assert len(ratings) == 20_000
    assert not ratings.duplicated(["user", "item"]).any()
    assert ratings["user"].min() >= 1 and ratings["user"].max() <= 300
    assert ratings["item"].min() >= 1 and ratings["item"].max() <= 400
    assert ratings["user"].nunique() == 300
    assert ratings.groupby("user").size().min() >= 5
    assert set(ratings["rating"].unique()) <= {1, 2, 3, 4, 5}
    assert ratings["rating"].nunique() == 5
    ts = pd.to_datetime(ratings["timestamp"], unit="s")
    assert ts.dt.year.between(1997, 1998).all()
    assert ratings["timestamp"].is_monotonic_increasing

    assert list(movies.columns) == ["movieId", "title", "year", "genres"]
    assert (movies["movieId"].to_numpy() == np.arange(1, 401)).all()
    parsed = movies["title"].str.extract(r"^Synthetic Movie (\d+) \((\d{4})\)$").astype(int)
    assert (parsed[0] == movies["movieId"]).all() and (parsed[1] == movies["year"]).all()
    genres = movies["genres"].str.split("|").explode()
    assert genres.isin(GENRES).all() and genres.nunique() > 10


def test_popularity_and_activity_are_long_tailed() -> None:
    ratings, _ = synth_ratings(seed=2)
    per_item = np.sort(ratings.groupby("item").size().to_numpy())[::-1]
    per_user = ratings.groupby("user").size()
    top_decile_share = per_item[: len(per_item) // 10].sum() / per_item.sum()
    assert top_decile_share > 0.3                      # 3x its uniform share
    assert per_item[0] > 10 * np.median(per_item)
    assert per_user.max() > 5 * per_user.median()


def test_ratings_signal_biases_then_factors() -> None:
    """Held-out RMSE: biases beat the global mean, and factors beat biases by 10%+."""
    ratings, _ = synth_ratings(seed=0)
    u = ratings["user"].to_numpy() - 1
    i = ratings["item"].to_numpy() - 1
    r = ratings["rating"].to_numpy(float)
    nu, ni = u.max() + 1, i.max() + 1
    valid = np.random.default_rng(1).random(len(r)) < 0.2
    tr = ~valid

    def rmse(pred):
        return float(np.sqrt(np.mean((r[valid] - pred) ** 2)))

    global_rmse = rmse(r[tr].mean())
    mu, bu, bi = _bias_fit(u[tr], i[tr], r[tr], nu, ni)
    bias_rmse = rmse(mu + bu[u[valid]] + bi[i[valid]])
    res = r[tr] - mu - bu[u[tr]] - bi[i[tr]]
    p, q = _als_residual_fit(u[tr], i[tr], res, nu, ni)
    mf = mu + bu[u[valid]] + bi[i[valid]] + np.einsum("nk,nk->n", p[u[valid]], q[i[valid]])
    mf_rmse = rmse(np.clip(mf, 1, 5))
    assert bias_rmse < 0.95 * global_rmse
    assert mf_rmse < 0.9 * bias_rmse


def test_write_ratings_movielens_format_and_byte_identical(tmp_path) -> None:
    p1 = write_ratings(tmp_path / "a", users=50, items=60, ratings=1000, seed=3)
    p2 = write_ratings(tmp_path / "b", users=50, items=60, ratings=1000, seed=3)
    assert set(p1) == {"u.data", "movies.csv"}
    for name in p1:
        assert p1[name].read_bytes() == p2[name].read_bytes()
    lines = p1["u.data"].read_text().splitlines()
    assert len(lines) == 1000
    assert all(re.fullmatch(r"\d+\t\d+\t[1-5]\t\d+", line) for line in lines)
    frame, movies = synth_ratings(users=50, items=60, ratings=1000, seed=3)
    back = pd.read_csv(p1["u.data"], sep="\t", header=None,
                       names=["user", "item", "rating", "timestamp"])
    pd.testing.assert_frame_equal(back, frame)
    pd.testing.assert_frame_equal(pd.read_csv(p1["movies.csv"]), movies)
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == sorted(p1)


def test_ratings_reject_impossible_sizes() -> None:
    with pytest.raises(DataError, match="ratings"):
        synth_ratings(users=100, items=50, ratings=100)       # < 5 per user
    with pytest.raises(DataError, match="ratings"):
        synth_ratings(users=10, items=20, ratings=150)        # > items/2 per user
    with pytest.raises(DataError, match="items"):
        synth_ratings(users=1, items=4, ratings=5)            # cannot give 5 distinct items


@pytest.mark.slow
def test_ratings_scale_ten_million(tmp_path) -> None:
    start = time.perf_counter()
    paths = write_ratings(tmp_path, users=100_000, items=20_000, ratings=10_000_000, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 60
    with paths["u.data"].open("rb") as fh:
        assert sum(1 for _ in fh) == 10_000_000
