"""modeling.schema: request validation names the record and field of every bad value."""

from __future__ import annotations

import datetime as dt
import warnings

import numpy as np
import pandas as pd
import pytest

from modeling.schema import InputField, InputSchema, RecordsError, canonical_strings

SCHEMA = InputSchema([
    InputField("n", "int"),
    InputField("opt", "int", required=False),
    InputField("x", "float", required=False),
    InputField("flag", "bool", required=False),
    InputField("day", "date", required=False),
    InputField("code", "str", required=False, allowed=["0", "a"]),
    InputField("user", "id", required=False),
])


def errors_of(df: pd.DataFrame) -> list[tuple[int, str, str]]:
    with pytest.raises(RecordsError) as info:
        SCHEMA.validate(df)
    return [(e.record, e.field, e.msg) for e in info.value.errors]


@pytest.mark.parametrize("huge", [1e30, -1e30, 2**70, -(2**70), 2**63, 2**64 + 1, "99999999999999999999999"])
@pytest.mark.parametrize("with_missing", [False, True])
def test_int_out_of_int64_is_a_clean_record_error(huge, with_missing) -> None:
    column = [3, huge, None] if with_missing else [3, huge]
    for field in ("n", "opt"):  # required and optional
        df = pd.DataFrame({"n": [1] * len(column), field: pd.Series(column, dtype=object)})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "invalid value encountered in cast" wrap-around
            errs = errors_of(df)
        assert (1, field, f"integer {huge!r} out of range (int64)") in errs
        if with_missing and field == "n":
            assert (2, "n", "field required") in errs


def test_int_edges_infinities_fractions_and_missing() -> None:
    ok = SCHEMA.validate(pd.DataFrame({"n": pd.Series([2**63 - 1, -(2**63)], dtype=object)}))
    assert ok["n"].dtype == np.int64 and ok["n"].tolist() == [2**63 - 1, -(2**63)]
    exact = SCHEMA.validate(pd.DataFrame({"n": [1, 2], "opt": pd.Series([2**63 - 1, None], dtype=object)}))
    assert str(exact["opt"].dtype) == "Int64" and exact["opt"].tolist() == [2**63 - 1, pd.NA]
    errs = errors_of(pd.DataFrame({"n": [1, 2, 3], "opt": [float("inf"), 1.5, np.nan]}))
    assert errs == [(0, "opt", "value inf is not a valid int"), (1, "opt", "value 1.5 is not a valid int")]
    assert errors_of(pd.DataFrame({"n": [1.0, None]})) == [(1, "n", "field required")]
    assert errors_of(pd.DataFrame({"n": pd.Series(["x", 4], dtype=object)})) == [
        (0, "n", "value 'x' is not a valid int")]
    uint = errors_of(pd.DataFrame({"n": pd.Series([2**64 - 1, 1], dtype="uint64")}))
    assert uint == [(0, "n", f"integer {2**64 - 1} out of range (int64)")]


def test_valid_values_are_coerced_and_typed_columns_pass_through() -> None:
    df = pd.DataFrame({"n": [1, 2, 3], "opt": [1.0, None, "4"], "x": ["1.5", 2, None],
                       "flag": ["TRUE", "false", 1], "day": ["2015-07-31", None, "2015-08-01"],
                       "code": ["0", 0, None], "user": [1.0, "7", 2**70]})
    out = SCHEMA.validate(df)
    assert out["n"].dtype == np.int64 and str(out["opt"].dtype) == "Int64"
    assert out["opt"].tolist() == [1, pd.NA, 4]
    assert out["x"].tolist()[:2] == [1.5, 2.0] and np.isnan(out["x"].iloc[2])
    assert out["flag"].tolist() == [1.0, 0.0, 1.0]
    assert out["day"].dtype == "datetime64[ns]" and out["day"].isna().tolist() == [False, True, False]
    assert out["code"].tolist() == ["0", "0", None]
    assert out["user"].tolist() == ["1", "7", str(2**70)]
    assert list(out.columns) == list(df.columns) and df["opt"].tolist()[1] is None  # input untouched
    typed = pd.DataFrame({"n": np.arange(3), "day": pd.to_datetime(["2015-01-01"] * 3)})
    again = SCHEMA.validate(typed)
    pd.testing.assert_frame_equal(again, typed)
    assert again is not typed


def test_canonical_strings_never_wrap_large_floats() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = canonical_strings(pd.Series([1e30, 1.0, -2.0, np.nan, np.inf]))
        mixed = canonical_strings(pd.Series([1e30, "1.0", 2**70, None], dtype=object))
    assert got.tolist() == ["1e+30", "1", "-2", None, "inf"]
    assert mixed.tolist() == ["1e+30", "1", str(2**70), None]


def test_dates_are_iso_8601_strings_or_typed_dates_never_numbers() -> None:
    schema = InputSchema([InputField("day", "date")])
    col = pd.Series(["2015-09-17", 20150917, 0, True, "01/02/2015", "17/09/2015", "2015-02-30", "2015-9-17"],
                    dtype=object)
    with pytest.raises(RecordsError) as info:
        schema.validate(pd.DataFrame({"day": col}), max_per_field=10)
    got = {e.record: e.msg for e in info.value.errors}
    assert set(got) == {1, 2, 3, 4, 5, 6, 7}
    assert got[1] == "value 20150917 is not an ISO 8601 date (YYYY-MM-DD)"
    assert got[3] == "value True is not an ISO 8601 date (YYYY-MM-DD)"
    assert got[4] == "value '01/02/2015' is not an ISO 8601 date (YYYY-MM-DD)"
    assert got[6] == "value '2015-02-30' is not a calendar date in the years 1678-2261"
    for numeric in (pd.Series([20150917, 20150918]), pd.Series([1.44e9, np.nan]), pd.Series([True, False])):
        with pytest.raises(RecordsError, match="not an ISO 8601 date"):
            schema.validate(pd.DataFrame({"day": numeric}))
    ok = schema.validate(pd.DataFrame({"day": ["2015-09-17", "2015-09-17T10:30", "2015-09-17 10:30:00.5"]}))
    assert ok["day"].tolist() == [pd.Timestamp("2015-09-17"), pd.Timestamp("2015-09-17 10:30"),
                                  pd.Timestamp("2015-09-17 10:30:00.5")]
    typed = pd.DataFrame({"day": pd.to_datetime(["2015-09-17"]).astype("datetime64[s]")})
    assert schema.validate(typed)["day"].dtype == "datetime64[s]"  # typed columns pass through
    objects = schema.validate(pd.DataFrame({"day": pd.Series([dt.date(2015, 9, 17)], dtype=object)}))
    assert objects["day"].tolist() == [pd.Timestamp("2015-09-17")]


def test_booleans_only_in_bool_fields() -> None:
    for field in ("n", "x", "user", "code"):
        with pytest.raises(RecordsError) as info:
            SCHEMA.validate(pd.DataFrame({"n": [1, 2], field: pd.Series([True, False], dtype=object)}))
        assert {(e.record, e.field) for e in info.value.errors} >= {(0, field), (1, field)}
    mixed = errors_of(pd.DataFrame({"n": pd.Series([1, True, np.True_], dtype=object)}))
    assert mixed == [(1, "n", "value True is not a valid int"), (2, "n", "value True is not a valid int")]
    ok = SCHEMA.validate(pd.DataFrame({"n": [1], "flag": [True]}))
    assert ok["flag"].tolist() == [1.0]
