"""The small-request path (`predict_records`: typed arrays, no DataFrame) against the frame path
and against batch scoring (`tabrec score`), on random raw rows: unknown stores, closed days,
missing or null `Open`, state holidays, dates inside and beyond the event calendar's horizon, in
random request groupings; ratings with unknown users and items. Also: every record the fast path
does not take falls back to the frame path (which words the errors), and `validate_records`
gives what `validate` gives after `records_frame`."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling.fastpath import SMALL_BATCH_ROWS
from modeling.predictors import RatingsPredictor, TabularPredictor, load_predictor
from modeling.schema import InputField, InputSchema, RecordsError
from pipelines.batch import score_file
from service.schemas import InputError, records_frame

REL = 1e-6
ROSSMANN_COLUMNS = ["Store", "DayOfWeek", "Date", "Open", "Promo", "StateHoliday", "SchoolHoliday"]


@pytest.fixture(scope="module")
def ross(bundles: dict[str, str]) -> TabularPredictor:
    p = load_predictor(bundles["rossmann"])
    assert isinstance(p, TabularPredictor)
    return p


@pytest.fixture(scope="module")
def ratings(bundles: dict[str, str]) -> RatingsPredictor:
    p = load_predictor(bundles["ratings"])
    assert isinstance(p, RatingsPredictor)
    return p


def horizon(p: TabularPredictor) -> pd.Timestamp:
    return pd.Timestamp(p.calendar_info()[0]["horizon"][1])


def random_rossmann(rng: np.random.Generator, n: int, last: pd.Timestamp) -> list[dict[str, Any]]:
    """Raw rows as a client sends them: stores 1-12 are known, others not; dates from a year
    before the calendar's horizon to well beyond it; Open 0/1/1.0/null/absent."""
    stores = np.where(rng.random(n) < 0.8, rng.integers(1, 13, n), rng.integers(13, 5000, n))
    days = rng.integers(-400, 200, n)
    days[rng.random(n) < 0.03] = 5000  # far beyond any repeat of the calendar
    rows = []
    for i in range(n):
        date = last + pd.Timedelta(days=int(days[i]))
        row: dict[str, Any] = {
            "Store": int(stores[i]), "Date": date.strftime("%Y-%m-%d"),
            "Promo": int(rng.integers(0, 2)), "StateHoliday": str(rng.choice(["0", "0", "0", "a", "b", "c"])),
            "SchoolHoliday": int(rng.integers(0, 2)),
        }
        if rng.random() < 0.7:
            row["DayOfWeek"] = int(date.dayofweek) + 1
        open_kind = rng.integers(0, 5)
        if open_kind < 3:
            row["Open"] = [1, 0, 1.0][open_kind]
        elif open_kind == 3:
            row["Open"] = None
        rows.append(row)
    return rows


def groups(rng: np.random.Generator, n: int, most: int) -> list[slice]:
    cuts, start = [], 0
    while start < n:
        size = int(rng.choice([1, 1, 2, 5, 17, most]))
        cuts.append(slice(start, min(n, start + size)))
        start += size
    return cuts


def fast(p: TabularPredictor | RatingsPredictor, records: list[dict[str, Any]]) -> np.ndarray:
    out = p.predict_records(records)
    assert out is not None, records[:3]
    return out


def frame_padded(p: TabularPredictor | RatingsPredictor, records: list[dict[str, Any]]) -> np.ndarray:
    """The frame path with the batch path's numerics: at least SMALL_BATCH_ROWS rows per call."""
    filler = [records[0]] * max(0, SMALL_BATCH_ROWS - len(records))
    return p.predict(records_frame(records + filler, keep=p.schema.names))[: len(records)]


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=REL, atol=0)


def test_rossmann_fast_path_equals_batch_scoring(ross: TabularPredictor, bundles: dict[str, str],
                                                 tmp_path) -> None:
    rng = np.random.default_rng(15)
    rows = random_rossmann(rng, 3000, horizon(ross))
    fast_preds = np.concatenate([fast(ross, rows[g]) for g in groups(rng, len(rows), 256)])
    assert (fast_preds == 0).sum() > 100 and (fast_preds > 0).sum() > 1000  # closed and open days
    frame = pd.DataFrame.from_records(rows, columns=ROSSMANN_COLUMNS).reset_index(names="Id")
    frame["Id"] += 1
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "scored.parquet"
    score_file(bundles["rossmann"], path, out, quiet=True, track=False, batch_rows=700)
    scored = pd.read_parquet(out).sort_values("Id")
    assert scored["Id"].tolist() == frame["Id"].tolist()
    assert_close(fast_preds, scored["prediction"].to_numpy(dtype=np.float64))


def real_shaped_ensemble(p: TabularPredictor, members: int = 3) -> list[Any]:
    """`members` eval-mode networks with the bundle's inputs and the default training's shapes
    (1000/500 hidden units, the default 3-member snapshot ensemble), random weights and
    BatchNorm statistics (the test bundle itself is trained small: 500/250, one network)."""
    import torch

    from modeling.tabular import TabularModel

    net = p.networks[0]
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(members):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        m = TabularModel(net.emb_szs, net.n_cont, layers=(1000, 500), y_range=net.y_range)
        with torch.no_grad():
            for emb in m.embeds:
                emb.weight.normal_(0, 0.3, generator=gen)
            for bn in [m.bn_cont, *(b[2] for b in m.layers)]:
                bn.running_mean.normal_(0, 0.5, generator=gen)
                bn.running_var.uniform_(0.5, 2.0, generator=gen)
                bn.weight.uniform_(0.5, 1.5, generator=gen)
                bn.bias.normal_(0, 0.1, generator=gen)
            m.head.weight.normal_(0, 0.05, generator=gen)
            m.init_output_bias(8.5)
        out.append(m.eval())
    return out


def test_forward_rows_do_not_depend_on_request_size(ross: TabularPredictor) -> None:
    """On real shapes (see `real_shaped_ensemble`) and on the bundle's own network: with one
    torch thread a row's answer from a request of any size has exactly the bits batch scoring
    gives it (small requests run their products on the fewest rows, at most 16, from which this
    machine's float32 kernels give the batch's bits: `_Projected._calibrate`); with two threads
    (other work splits) every size agrees to 1e-6."""
    import torch

    from modeling.forward import forward_chunks, forward_small

    rows = random_rossmann(np.random.default_rng(3), 1200, horizon(ross))
    frame = records_frame(rows, keep=ross.schema.names)
    x_cat, x_cont = ross.processor.transform(ross.engineer(frame))
    threads = torch.get_num_threads()
    try:
        for networks in (real_shaped_ensemble(ross), ross.networks):
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                batch = forward_chunks(networks, (x_cat, x_cont))
                assert np.exp(batch).std() > 5 and np.isfinite(batch).all()  # the rows' answers vary
                cache: dict[str, Any] = {}  # prepared once per set of networks, as a predictor keeps it
                for size in (1, 2, 3, 4, 5, 7, 12, 15, 16, 33, 256):
                    cuts = [slice(s, min(s + size, len(x_cat))) for s in range(0, len(x_cat), size)]
                    small = np.concatenate([forward_small(networks, (x_cat[c], x_cont[c]), cache) for c in cuts])
                    np.testing.assert_allclose(np.exp(small), np.exp(batch), rtol=REL, atol=0,
                                               err_msg=f"{size=} {n_threads=}")
                    if n_threads == 1:
                        assert np.array_equal(small, batch), f"{size=}"
    finally:
        torch.set_num_threads(threads)


def test_projected_first_layer_agrees_with_the_modules(ross: TabularPredictor,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The projected first layer (tables pushed through the first Linear at load) against the
    networks' own modules and against the gathered first layer (what tables too big to project
    and networks without hidden layers take), on real shapes and the bundle's network: the same
    answers to float32 rounding (the modules' own head is float32: ~1e-6 of Sales); the gathered
    layer keeps a row's bits whatever the request size too; a network without hidden layers runs."""
    import torch

    from modeling import fastpath
    from modeling.forward import forward_chunks, forward_small
    from modeling.tabular import TabularModel

    rows = random_rossmann(np.random.default_rng(4), 600, horizon(ross))
    x_cat, x_cont = ross.processor.transform(ross.engineer(records_frame(rows, keep=ross.schema.names)))
    net = ross.networks[0]
    bare = TabularModel(net.emb_szs, net.n_cont, layers=(), y_range=net.y_range).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for networks in (real_shaped_ensemble(ross), ross.networks, [bare]):
            projected = fastpath.TabularForward(networks)
            assert (projected.projected is not None) == bool(networks[0].layer_sizes)
            with monkeypatch.context() as m:
                m.setattr(fastpath, "PROJECTION_LIMIT", 0)
                gathered = fastpath.TabularForward(networks)
                assert gathered.projected is None
                batch = gathered(x_cat, x_cont)
                for size in (1, 15, 16, 33):
                    small = np.concatenate([forward_small(networks, (x_cat[s : s + size], x_cont[s : s + size]),
                                                          {"key": tuple(map(id, networks)), "forward": gathered})
                                            for s in range(0, len(x_cat), size)])
                    assert np.array_equal(small, batch), f"{size=}"
            with torch.no_grad():
                modules = np.mean([m(torch.from_numpy(x_cat), torch.from_numpy(x_cont)).double().numpy()
                                   for m in networks], axis=0)
            got = forward_chunks(networks, (x_cat, x_cont))
            np.testing.assert_array_equal(got, projected(x_cat, x_cont))
            assert np.exp(modules).std() > 5  # the rows' answers vary
            np.testing.assert_allclose(np.exp(got), np.exp(batch), rtol=1e-5, atol=0)
            np.testing.assert_allclose(np.exp(got), np.exp(modules), rtol=1e-5, atol=0)
    finally:
        torch.set_num_threads(threads)


def test_ratings_fast_path_equals_batch_scoring(ratings: RatingsPredictor, bundles: dict[str, str],
                                                tmp_path) -> None:
    rng = np.random.default_rng(7)
    n = 2000
    users = rng.integers(1, 260, n)  # 200 users trained: some unknown
    items = rng.integers(1, 380, n)
    rows = [{"user": str(u) if rng.random() < 0.5 else int(u), "item": str(i)} for u, i in zip(users, items, strict=True)]
    fast_preds = np.concatenate([fast(ratings, rows[g]) for g in groups(rng, n, 200)])
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"user": users, "item": items}).to_csv(path, index=False)
    out = tmp_path / "scored.parquet"
    score_file(bundles["ratings"], path, out, quiet=True, track=False)
    assert_close(fast_preds, pd.read_parquet(out)["prediction"].to_numpy(dtype=np.float64))
    unknown = ratings.predict_records([{"user": "no-such-user", "item": "no-such-item"}])
    assert unknown is not None and np.isfinite(unknown).all()


record_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(2**70), 2**70), st.sampled_from([2**53 + 1, -(2**60)]), st.sampled_from([1.0, 0.0, 1.5, 2.0**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["0", "1", "a", "b", "d", "", " 1", "1.0", "x", "007", "1e3", "-0", "+5", "\u0663", "nan",
                     "9223372036854775808", "123456789012"]),
    st.sampled_from(["2015-07-31", "2015-02-30", "2015-7-31", "01/02/2015", "2015-07-31T10:00", "9999-01-01",
                     "1677-01-01", "2015-13-01", "0001-01-01"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.sampled_from(["i", "j", "f", "s", "d", "b", "u", "x"]), record_values),
                min_size=1, max_size=6))
def test_validate_records_matches_validate(records: list[dict[str, Any]]) -> None:
    """Whatever the values: either validate_records returns the arrays `validate` gives after
    `records_frame`, or None (then the frame path decides; it may accept what the fast path
    left to it, e.g. numeric strings)."""
    schema = InputSchema([InputField("i", "int"), InputField("j", "int", required=False),
                          InputField("f", "float", required=False), InputField("s", "str", allowed=["0", "a", "b"]),
                          InputField("d", "date"), InputField("b", "bool", required=False),
                          InputField("u", "id", required=False), InputField("x", "id", required=False,
                                                                                allowed=["1", "2", "a"])])
    got = schema.validate_records(records)
    if got is None:
        return
    clean = schema.validate(records_frame(records, keep=schema.names))  # must not raise
    assert sorted(got) == sorted(c for c in clean.columns)
    for name, arr in got.items():
        col = clean[name]
        if arr.dtype.kind in "iuf":
            want = col.to_numpy(dtype=np.float64, na_value=np.nan)
            np.testing.assert_array_equal(arr.astype(np.float64), want)
            if arr.dtype.kind == "i":
                assert col.dtype == np.int64
        elif arr.dtype.kind == "M":
            np.testing.assert_array_equal(arr, col.to_numpy(dtype="datetime64[ns]"))
        else:
            assert arr.tolist() == [None if v is None or (isinstance(v, float) and math.isnan(v)) else v
                                    for v in col.tolist()]


BAD_ROSSMANN = [
    {"Store": "x"}, {"Store": True}, {"Store": 1.5}, {"Store": 2**64}, {"Store": None}, {"Date": "2015-02-30"},
    {"Date": "01/02/2015"}, {"Date": 20150917}, {"Open": float("nan")}, {"Open": "1"}, {"StateHoliday": "d"},
    {"StateHoliday": 0.0}, {"StateHoliday": False}, {"Promo": [1]}, {"Promo": float("inf")}, {"SchoolHoliday": "1"},
]


@pytest.mark.parametrize("change", BAD_ROSSMANN, ids=[repr(c) for c in BAD_ROSSMANN])
def test_records_the_fast_path_leaves_to_the_frame_path(ross: TabularPredictor, change: dict[str, Any]) -> None:
    good = {"Store": 1, "DayOfWeek": 5, "Date": "2015-07-31", "Open": 1, "Promo": 1, "StateHoliday": "0",
            "SchoolHoliday": 1}
    assert ross.predict_records([good]) is not None
    # an int code is read as its decimal string, as the frame path reads it
    assert ross.predict_records([{**good, "StateHoliday": 0}]) == ross.predict_records([good])
    assert ross.predict_records([good, {**good, **change}]) is None
    missing = {k: v for k, v in good.items() if k != "Store"}
    assert ross.predict_records([missing]) is None
    with pytest.raises((RecordsError, InputError)):
        ross.predict(records_frame([missing], keep=ross.schema.names))


def test_service_answers_from_the_fast_path(ross: TabularPredictor, module_store: dict) -> None:
    """Through HTTP: a one-record request (fast path) and the same record among 300 others (frame
    path) get the same prediction; /invocations in each format too; a bad value keeps its 422."""
    from service import Settings, create_app

    cfg = Settings(models={"rossmann": "models:/rossmann@champion"}, tracking_uri=module_store["tracking_uri"])
    rng = np.random.default_rng(3)
    rows = random_rossmann(rng, 300, horizon(ross))
    with TestClient(create_app(cfg)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.1)
        big = client.post("/v1/models/rossmann/predict", json={"records": rows})
        assert big.status_code == 200, big.text
        want = np.array(big.json()["predictions"], dtype=np.float64)
        for i in (0, 1, 2, 150, 299):
            one = client.post("/v1/models/rossmann/predict", json={"records": [rows[i]]})
            assert one.status_code == 200 and one.json()["model"] == "rossmann"
            assert_close(np.array(one.json()["predictions"]), want[i : i + 1])
        split = {"columns": ROSSMANN_COLUMNS, "data": [[r.get(c) for c in ROSSMANN_COLUMNS] for r in rows[:10]]}
        for body in ({"dataframe_records": rows[:10]}, {"instances": rows[:10]}, {"dataframe_split": split}):
            inv = client.post("/invocations", json=body)
            assert inv.status_code == 200, inv.text
            assert_close(np.array(inv.json()["predictions"]), want[:10])
        bad = client.post("/v1/models/rossmann/predict", json={"records": [{**rows[0], "Date": "2015-02-30"}]})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["field"] == "Date" and "calendar date" in bad.json()["detail"][0]["msg"]


def test_the_service_warms_a_model_up_before_it_serves(module_store: dict) -> None:
    """A refresh prepares the forward (projected tables) and calibrates the small-request padding
    for the current thread count before the model is swapped in, so no request pays for them."""
    import torch

    from service.registry import ModelRegistry

    registry = ModelRegistry({"rossmann": "models:/rossmann@champion"})  # module_store: its tracking URI
    report = registry.refresh()
    assert [e.status for e in report.entries] == ["loaded"], report.entries
    predictor = registry.get("rossmann").predictor
    forward = predictor._small.get("forward")
    assert forward is not None and forward.projected is not None
    pad_to = forward.projected._pad_to[torch.get_num_threads()]
    assert all(n <= pad_to[n] <= 16 for n in range(1, 16))
