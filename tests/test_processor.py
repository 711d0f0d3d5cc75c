"""TabularProcessor: categorify, fill, normalise, serialise."""

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling.errors import DataError
from modeling.processor import NotFittedError, TabularProcessor


def _train_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "store": [3, 1, 2, 1, 3],
            "state": ["b", "a", None, "a", "c"],
            "holiday": [True, False, False, True, False],
            "day": pd.to_datetime(["2015-07-01", "2015-07-02", "2015-07-01", None, "2015-07-03"]),
            "kind": pd.Categorical(["x", "y", "x", "y", None]),
            "dist": [100.0, np.nan, 300.0, 250.0, 10.0],
            "temp": [1, 2, 3, 4, 5],
        }
    )


CATS = ["store", "state", "holiday", "day", "kind"]
CONTS = ["dist", "temp"]


def test_vocab_is_sorted_canonical_strings_and_cardinality_counts_unknown() -> None:
    proc = TabularProcessor(CATS, CONTS).fit(_train_frame())
    assert proc.vocab["store"] == ["1", "2", "3"]
    assert proc.vocab["state"] == ["a", "b", "c"]
    assert proc.vocab["holiday"] == ["False", "True"]
    assert proc.vocab["day"] == ["2015-07-01", "2015-07-02", "2015-07-03"]
    assert proc.vocab["kind"] == ["x", "y"]
    assert proc.cardinalities["store"] == 4
    assert proc.cardinalities["dist_na"] == 3
    assert proc.cat_names_out == [*CATS, "dist_na"]


def test_unseen_and_missing_categories_map_to_zero() -> None:
    proc = TabularProcessor(["state"], []).fit(pd.DataFrame({"state": ["a", "b"]}))
    x_cat, x_cont = proc.transform(pd.DataFrame({"state": ["b", "zzz", None, np.nan, "a"]}))
    assert x_cat.dtype == np.int64 and x_cat.shape == (5, 1)
    assert x_cont.dtype == np.float32 and x_cont.shape == (5, 0)
    assert x_cat[:, 0].tolist() == [2, 0, 0, 0, 1]


def test_training_values_never_map_to_zero_even_with_missing() -> None:
    df = _train_frame()
    x_cat, _ = TabularProcessor(CATS, CONTS).fit_transform(df)
    for j, col in enumerate(CATS):
        assert ((x_cat[:, j] == 0) == df[col].isna().to_numpy()).all(), col


@pytest.mark.parametrize("train_values", [[1, 2, 3], [1.0, 2.0, np.nan], ["1", "2", "3"]])
def test_int_float_and_string_forms_share_a_code(train_values: list) -> None:
    proc = TabularProcessor(["id"], []).fit(pd.DataFrame({"id": train_values}))
    probe = pd.DataFrame(
        {"id": pd.Series([1, 1.0, "1", np.int64(1), np.float32(1.0)], dtype=object)}
    )
    codes = proc.transform(probe)[0][:, 0]
    assert len(set(codes.tolist())) == 1 and codes[0] != 0


def test_bool_and_datetime_values_match_their_string_forms() -> None:
    proc = TabularProcessor(["holiday", "day"], []).fit(_train_frame())
    probe = pd.DataFrame(
        {
            "holiday": pd.Series(["True", np.bool_(True), "False", False], dtype=object),
            "day": ["2015-07-02", pd.Timestamp("2015-07-02"), "2015-07-03", "1999-01-01"],
        }
    )
    x_cat, _ = proc.transform(probe)
    assert x_cat[0, 0] == x_cat[1, 0] == 2 and x_cat[2, 0] == x_cat[3, 0] == 1
    assert x_cat[0, 1] == x_cat[1, 1] == 2 and x_cat[2, 1] == 3 and x_cat[3, 1] == 0


def test_categorical_dtype_uses_category_values() -> None:
    proc = TabularProcessor(["kind"], []).fit(_train_frame())
    probe = pd.DataFrame({"kind": pd.Categorical(["y", "q", None], categories=["q", "y"])})
    assert proc.transform(probe)[0][:, 0].tolist() == [2, 0, 0]


def test_json_round_trip_gives_identical_arrays_on_fresh_data() -> None:
    proc = TabularProcessor(CATS, CONTS).fit(_train_frame())
    text = json.dumps(proc.to_dict(), allow_nan=False)  # must be pure JSON
    loaded = TabularProcessor.from_json(proc.to_json())
    assert TabularProcessor.from_dict(json.loads(text)).to_dict() == proc.to_dict()
    rng = np.random.default_rng(0)
    fresh = pd.DataFrame(
        {
            "store": rng.integers(0, 6, 200),
            "state": rng.choice(["a", "b", "c", "d", None], 200),
            "holiday": rng.integers(0, 2, 200).astype(bool),
            "day": pd.Timestamp("2015-06-30") + pd.to_timedelta(rng.integers(0, 5, 200), "D"),
            "kind": rng.choice(["x", "y", "w"], 200),
            "dist": np.where(rng.random(200) < 0.2, np.nan, rng.random(200) * 500),
            "temp": rng.normal(3, 2, 200),
        }
    )
    a_cat, a_cont = proc.transform(fresh)
    b_cat, b_cont = loaded.transform(fresh)
    np.testing.assert_array_equal(a_cat, b_cat)
    np.testing.assert_array_equal(a_cont, b_cont)
    assert (a_cat > 0).any() and (a_cat == 0).any()


def test_na_flag_only_for_columns_with_training_missing_values() -> None:
    proc = TabularProcessor([], ["dist", "temp"]).fit(_train_frame())
    assert proc.cat_names_out == ["dist_na"]
    probe = pd.DataFrame({"dist": [np.nan, 5.0], "temp": [np.nan, 1.0]})
    x_cat, x_cont = proc.transform(probe)
    assert x_cat[:, 0].tolist() == [2, 1]
    assert np.isfinite(x_cont).all()  # temp had no training NaN: filled, no flag


def test_na_flags_can_be_disabled() -> None:
    proc = TabularProcessor([], ["dist"], add_na_flags=False).fit(_train_frame())
    assert proc.cat_names_out == [] and proc.cardinalities == {}
    assert proc.transform(_train_frame())[0].shape == (5, 0)


def test_median_fill_and_normalisation_stats() -> None:
    train = pd.DataFrame({"v": [1.0, 2.0, np.nan, 10.0, np.inf]})
    proc = TabularProcessor([], ["v"]).fit(train)
    filled = np.array([1.0, 2.0, 2.0, 10.0, 2.0])  # median of the finite values is 2
    assert proc.medians["v"] == 2.0
    assert proc.means["v"] == pytest.approx(filled.mean())
    assert proc.stds["v"] == pytest.approx(filled.std())
    _, x = proc.transform(train)
    assert x[:, 0].mean() == pytest.approx(0.0, abs=1e-6)
    assert x[:, 0].std() == pytest.approx(1.0, abs=1e-5)
    _, raw = TabularProcessor([], ["v"], normalize=False).fit_transform(train)
    np.testing.assert_allclose(raw[:, 0], filled)


def test_constant_or_all_missing_column_does_not_divide_by_zero() -> None:
    train = pd.DataFrame({"c": [5.0, 5.0, 5.0], "m": [np.nan, np.nan, np.nan]})
    proc = TabularProcessor([], ["c", "m"]).fit(train)
    assert proc.stds == {"c": 1.0, "m": 1.0}
    _, x = proc.transform(pd.DataFrame({"c": [5.0, 7.0], "m": [1.0, np.nan]}))
    np.testing.assert_allclose(x, [[0.0, 1.0], [2.0, 0.0]])


def test_continuous_accepts_bool_datetime_and_numeric_strings() -> None:
    train = pd.DataFrame(
        {
            "flag": [True, False],
            "when": pd.to_datetime(["1970-01-02 00:00", "1970-01-01 00:01"]),
            "s": ["1.5", " 2 "],
        }
    )
    _, x = TabularProcessor([], ["flag", "when", "s"], normalize=False).fit_transform(train)
    np.testing.assert_allclose(x, [[1.0, 86400.0, 1.5], [0.0, 60.0, 2.0]])


def test_non_numeric_string_in_continuous_column_names_column_row_and_value() -> None:
    proc = TabularProcessor([], ["dist"]).fit(_train_frame())
    bad = pd.DataFrame({"dist": ["1", "2", "12km"]}, index=[10, 11, 12])
    with pytest.raises(DataError, match=r"'dist'.*'12km'.*row 12"):
        proc.transform(bad)
    with pytest.raises(DataError, match="dist"):
        TabularProcessor([], ["dist"]).fit(bad)


def test_missing_column_raises_data_error_naming_it() -> None:
    proc = TabularProcessor(CATS, CONTS).fit(_train_frame())
    with pytest.raises(DataError, match="temp"):
        proc.transform(_train_frame().drop(columns=["temp"]))
    with pytest.raises(DataError, match="store"):
        TabularProcessor(CATS, CONTS).fit(_train_frame().drop(columns=["store"]))


def test_transform_before_fit_is_a_clear_error() -> None:
    proc = TabularProcessor(["a"], [])
    assert not proc.is_fitted
    with pytest.raises(NotFittedError, match="fit"):
        proc.transform(pd.DataFrame({"a": [1]}))
    assert proc.fit(pd.DataFrame({"a": [1]})).is_fitted


def test_from_dict_rejects_foreign_state() -> None:
    with pytest.raises(ValueError, match="format"):
        TabularProcessor.from_dict({"format": "other", "version": 1})


def test_classes_to_code_matches_transform() -> None:
    proc = TabularProcessor(["store"], []).fit(_train_frame())
    assert proc.classes_to_code("store", ["3", 1, 99, None]).tolist() == [3, 1, 0, 0]
    assert proc.code_to_class("store", [0, 2]).tolist() == [None, "2"]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(-5, 5), st.sampled_from(["a", "b", "1", "x y"]), st.none()),
        min_size=1,
        max_size=30,
    )
)
def test_codes_are_consistent_with_canonical_values(values: list) -> None:
    df = pd.DataFrame({"c": pd.Series(values, dtype=object)})
    proc = TabularProcessor(["c"], []).fit(df)
    codes = proc.transform(df)[0][:, 0]
    assert ((codes == 0) == df["c"].isna().to_numpy()).all()
    assert codes.max() < proc.cardinalities["c"]
    keys = [None if v is None else str(v) for v in values]
    for i in range(len(values)):
        for j in range(len(values)):
            if keys[i] is not None and keys[j] is not None:
                assert (codes[i] == codes[j]) == (keys[i] == keys[j])


# ---- the numeric fast path gives exactly the general path's codes

_MIXED_VOCAB = ["1", "2", "5", "-3", "0", "01", "abc", "2.5", "True", "False", "99999999999999999999", "1e3", "-0"]


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.integers(-10, 10), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=30
    ),
    kind=st.sampled_from(["int64", "int32", "uint8", "float64", "float32", "float_nan", "bool"]),
)
def test_numeric_fast_path_matches_general_lookup(values, kind):
    from modeling.processor import _general_codes, _int_table, _lookup_codes

    index = pd.Index(_MIXED_VOCAB, dtype=object)
    arr = np.asarray(values, dtype=object)
    if kind == "bool":
        s = pd.Series(np.asarray([v % 2 == 0 for v in values]))
    elif kind == "uint8":
        s = pd.Series(np.asarray([v % 256 for v in values], dtype=np.uint8))
    elif kind == "int32":
        s = pd.Series(np.asarray([v % 2**31 for v in values], dtype=np.int32))
    elif kind.startswith("float"):
        x = np.asarray(values, dtype=np.float64) / np.where(np.abs(arr.astype(float)) < 8, 2.0, 1.0)
        if kind == "float_nan":
            x[:: 3] = np.nan
        s = pd.Series(x.astype(np.float32 if kind == "float32" else np.float64))
    else:
        s = pd.Series(np.asarray(values, dtype=np.int64))
    want = _general_codes(s, index)
    got = _lookup_codes(s, index, _int_table(index))
    np.testing.assert_array_equal(got, want)


def test_integer_columns_use_the_dense_table_and_wide_vocabularies_fall_back():
    from modeling.processor import _int_table

    lo, table = _int_table(pd.Index(["7", "x", "3", "-2"], dtype=object))
    assert lo == -2 and len(table) == 10 and table[7 + 2] == 1 and table[3 + 2] == 3 and table[0] == 4
    assert _int_table(pd.Index(["0", str(2**40)], dtype=object)) is None  # too wide: general path
    proc = TabularProcessor(["id"], []).fit(pd.DataFrame({"id": [0, 2**40, 5]}))
    codes, _ = proc.transform(pd.DataFrame({"id": [5, 2**40, 6, 0]}))
    assert codes[:, 0].tolist() == [3, 2, 0, 1]


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.one_of(st.sampled_from(["a", "b", "1", "True", "", "zz"]), st.none(), st.integers(0, 3),
                                 st.floats(allow_nan=True)), min_size=1, max_size=20))
def test_object_fast_path_matches_general_lookup(values):
    from modeling.processor import _general_codes, _int_table, _lookup_codes

    index = pd.Index(["a", "1", "True", "", "3", "nan"], dtype=object)
    s = pd.Series(values, dtype=object)
    np.testing.assert_array_equal(_lookup_codes(s, index, _int_table(index)), _general_codes(s, index))


def _array_columns(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Columns as the small-request path hands them over: ints (known, unknown, far outside the
    vocabulary, int64 extremes), strings with None/NaN/unknown, mixed objects, integral and
    fractional floats with NaN/inf, bools, narrow unsigned ints, datetimes."""
    big = np.array([0, 1, 2, 3, 7, -5, 2**62, -(2**63), 2**63 - 1], dtype=np.int64)
    return {
        "store": rng.choice(big, n),
        "state": rng.choice(np.array(["a", "b", "c", "zz", None, np.nan, ""], dtype=object), n),
        "holiday": rng.random(n) < 0.5,
        "day": rng.choice(pd.to_datetime(["2015-07-01", "2015-07-02", "2020-01-01"]).to_numpy(), n),
        "kind": rng.choice(np.array(["x", "y", 1, None, "x"], dtype=object), n),
        "code": rng.choice(np.array([1.0, 2.0, np.nan, 2.5, 40.0]), n),
        "small": rng.integers(0, 5, n).astype(np.uint8),
        "dist": rng.choice(np.array([100.0, np.nan, np.inf, -np.inf, 3.25, 1e9]), n),
        "temp": rng.integers(-10, 10, n),
    }


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40))
def test_transform_arrays_equals_transform(seed: int, n: int) -> None:
    """The small-request encoder (flat int tables, string dicts, one matrix for the continuous
    columns) gives exactly `transform`'s codes and float32 values, whatever the column types."""
    frame = _train_frame().assign(code=[1.0, 2.0, 3.0, np.nan, 2.0], small=[0, 1, 2, 3, 1])
    cats = [*CATS, "code", "small"]
    proc = TabularProcessor(cats, CONTS).fit(frame)
    cols = _array_columns(np.random.default_rng(seed), n)
    x_cat, x_cont = proc.transform_arrays(cols, n)
    ref_cat, ref_cont = proc.transform(pd.DataFrame(cols))
    np.testing.assert_array_equal(x_cat, ref_cat)
    np.testing.assert_array_equal(x_cont.view(np.int32), ref_cont.view(np.int32))
    assert x_cat.dtype == np.int64 and x_cont.dtype == np.float32
