"""Tests for the ratings readers: every supported layout, detection, validation errors, dedup."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modeling.errors import DataError
from pipelines.ingest.ratings import (
    RATING_FORMATS,
    detect_format,
    rating_scale,
    read_items,
    read_ratings,
)

SHARED = Path("/work/shared/data/ml-100k")
needs_shared = pytest.mark.skipif(not (SHARED / "u.data").exists(),
                                  reason="shared MovieLens-100k copy not present")


def _write(path: Path, text: str, encoding: str = "utf-8", newline: str = "\n") -> Path:
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


def _check_frame(df: pd.DataFrame) -> None:
    assert list(df.columns) == ["user", "item", "rating", "timestamp"]
    assert df["rating"].dtype == np.float32
    assert df["timestamp"].dtype == np.int64
    assert all(isinstance(v, str) for v in df["user"]) and all(isinstance(v, str) for v in df["item"])


# ---------------------------------------------------------------- formats
def test_ml100k_tab_separated(tmp_path) -> None:
    path = _write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n"
                                       "22\t377\t1\t878887116\n")
    assert detect_format(path) == "ml-100k"
    df = read_ratings(path)
    _check_frame(df)
    assert df["user"].tolist() == ["196", "186", "22"]
    assert df["item"].tolist() == ["242", "302", "377"]
    assert df["rating"].tolist() == [3.0, 3.0, 1.0]
    assert df["timestamp"].tolist() == [881250949, 891717742, 878887116]
    assert rating_scale(df) == (1.0, 3.0)          # observed scale when none is declared


def test_ml1m_double_colon(tmp_path) -> None:
    path = _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3.5::978302109\n"
                                            "2::3068::4::978299000\n")
    assert detect_format(path) == "ml-1m"
    df = read_ratings(path)
    _check_frame(df)
    assert df["item"].tolist() == ["1193", "661", "3068"]
    assert df["rating"].tolist() == [5.0, 3.5, 4.0]


def test_ml_latest_crlf_half_stars(tmp_path) -> None:
    path = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n"
                                            "1,3,0.5,964981247\n2,6,5.0,964982224\n",
                  newline="\r\n")
    assert detect_format(path) == "ml-latest"
    df = read_ratings(path)
    _check_frame(df)
    assert df["rating"].tolist() == [4.0, 0.5, 5.0]
    assert df["timestamp"].tolist() == [964982703, 964981247, 964982224]
    assert rating_scale(df) == (0.5, 5.0)


def test_gzipped_csv(tmp_path) -> None:
    path = tmp_path / "ratings.csv.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"userId,movieId,rating,timestamp\r\n7,70,2.5,100\r\n8,80,3.0,200\r\n")
    assert detect_format(path) == "ml-latest"
    df = read_ratings(path)
    assert df["user"].tolist() == ["7", "8"] and df["rating"].tolist() == [2.5, 3.0]


def test_generic_csv_explicit_columns_and_date_strings(tmp_path) -> None:
    path = _write(tmp_path / "books.csv", "who;isbn;stars;when;extra\n"
                                          "ann;0007;4;2020-01-02 00:00:00;x\n"
                                          "bob;0450;2;2020-01-03 00:00:10;y\n")
    assert detect_format(path) == "csv"
    df = read_ratings(path, user_col="who", item_col="isbn", rating_col="stars", time_col="when")
    _check_frame(df)
    assert df["user"].tolist() == ["ann", "bob"]
    assert df["item"].tolist() == ["0007", "0450"]         # ids kept verbatim, zeros and all
    assert df["timestamp"].tolist() == [1577923200, 1578009610]


def test_generic_csv_guesses_common_column_names(tmp_path) -> None:
    path = _write(tmp_path / "r.csv", "score,item_id,user_id\n3,10,u1\n5,11,u2\n")
    df = read_ratings(path)
    assert df["user"].tolist() == ["u1", "u2"] and df["item"].tolist() == ["10", "11"]
    assert df["rating"].tolist() == [3.0, 5.0]
    assert df["timestamp"].tolist() == [0, 0]               # absent -> 0


def test_headerless_csv(tmp_path) -> None:
    path = _write(tmp_path / "r.csv", "1,2,3.5\n4,5,1.0\n")
    df = read_ratings(path)
    assert df["user"].tolist() == ["1", "4"] and df["rating"].tolist() == [3.5, 1.0]


def test_parquet_with_numeric_and_float_ids(tmp_path) -> None:
    path = tmp_path / "r.parquet"
    pd.DataFrame({"userId": [1.0, 2.0, 3.0], "movieId": [10, 20, 30],
                  "rating": [1, 2, 3], "timestamp": [5, 6, 7]}).to_parquet(path)
    assert detect_format(path) == "parquet"
    df = read_ratings(path)
    _check_frame(df)
    assert df["user"].tolist() == ["1", "2", "3"]            # not "1.0"
    assert df["item"].tolist() == ["10", "20", "30"]


def test_format_constants_and_unknown_format(tmp_path) -> None:
    assert RATING_FORMATS == ("auto", "ml-100k", "ml-1m", "ml-latest", "csv", "parquet")
    path = _write(tmp_path / "u.data", "1\t2\t3\t4\n")
    with pytest.raises(DataError, match="unknown ratings format"):
        read_ratings(path, fmt="xlsx")


# ---------------------------------------------------------------- validation errors
def test_missing_and_empty_files(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_ratings(tmp_path / "nope.csv")
    empty = _write(tmp_path / "empty.csv", "")
    with pytest.raises(DataError, match=r"empty\.csv.*empty"):
        read_ratings(empty)
    header_only = _write(tmp_path / "head.csv", "userId,movieId,rating,timestamp\n")
    with pytest.raises(DataError, match=r"head\.csv: no ratings"):
        read_ratings(header_only)


def test_missing_column_named(tmp_path) -> None:
    path = _write(tmp_path / "r.csv", "user,item,score\n1,2,3\n")
    with pytest.raises(DataError, match=r"r\.csv: no column 'stars'"):
        read_ratings(path, rating_col="stars")
    unguessable = _write(tmp_path / "odd.csv", "a,b,c\nx,y,1\n")
    with pytest.raises(DataError, match=r"odd\.csv: cannot find the user column.*user_col"):
        read_ratings(unguessable)
    partial = _write(tmp_path / "p.csv", "user,item\n1,2\n")
    with pytest.raises(DataError, match="rating column"):
        read_ratings(partial)


def test_non_numeric_and_missing_ratings_name_line(tmp_path) -> None:
    path = _write(tmp_path / "bad.csv", "userId,movieId,rating,timestamp\n1,1,4.0,1\n"
                                        "1,2,abc,2\n2,1,,3\n")
    with pytest.raises(DataError) as err:
        read_ratings(path)
    msg = str(err.value)
    assert "bad.csv" in msg and "'rating'" in msg
    assert "line 3 ('abc')" in msg and "line 4" in msg and "2 row(s)" in msg


def test_ratings_outside_declared_scale(tmp_path) -> None:
    path = _write(tmp_path / "u.data", "1\t1\t5\t1\n1\t2\t6\t2\n2\t1\t0\t3\n")
    with pytest.raises(DataError) as err:
        read_ratings(path, scale=(1, 5))
    msg = str(err.value)
    assert "u.data" in msg and "'rating'" in msg and "[1, 5]" in msg
    assert "line 2" in msg and "line 3" in msg and "line 1" not in msg
    df = read_ratings(path)                                 # no scale: nothing rejected
    assert len(df) == 3 and rating_scale(df) == (0.0, 6.0)
    df = read_ratings(path, scale=(0, 10))
    assert rating_scale(df) == (0.0, 10.0)                  # the declared scale is recorded


def test_missing_ids_name_column_and_line(tmp_path) -> None:
    path = _write(tmp_path / "r.csv", "user_id,item_id,rating\nu1,i1,3\n,i2,4\nu3, ,5\n")
    with pytest.raises(DataError, match=r"r\.csv: column 'user_id'.*line 3"):
        read_ratings(path)
    ml = _write(tmp_path / "short.tsv", "1\t2\t3\t4\n5\t\t3\t4\n")
    with pytest.raises(DataError, match=r"short\.tsv: column 'item'.*line 2"):
        read_ratings(ml, fmt="ml-100k")


def test_blank_lines_do_not_shift_line_numbers(tmp_path) -> None:
    path = _write(tmp_path / "u.data", "1\t1\t5\t1\n\n1\t2\tx\t2\n")
    with pytest.raises(DataError, match="line 3 \\('x'\\)"):
        read_ratings(path, fmt="ml-100k")


def test_parquet_errors_use_row_numbers(tmp_path) -> None:
    path = tmp_path / "r.parquet"
    pd.DataFrame({"user": ["a", None], "item": ["x", "y"], "rating": [1.0, 2.0]}).to_parquet(path)
    with pytest.raises(DataError, match=r"r\.parquet: column 'user'.*row 2"):
        read_ratings(path)


def test_malformed_layouts(tmp_path) -> None:
    dat = _write(tmp_path / "ratings.dat", "1::2::3::4\n1:2::3::4\n")
    with pytest.raises(DataError, match=r"ratings\.dat.*line 2"):
        read_ratings(dat, fmt="ml-1m")
    wide = _write(tmp_path / "u.data", "1\t2\t3\t4\n1\t2\t3\t4\t5\n")
    with pytest.raises(DataError, match=r"u\.data: cannot parse"):
        read_ratings(wide)
    bad_ts = _write(tmp_path / "ts.csv", "user,item,rating,timestamp\n1,2,3,yesterday-ish\n"
                                         "1,3,3,100\n2,2,3,later\n")
    with pytest.raises(DataError, match=r"ts\.csv: column 'timestamp'.*line 2"):
        read_ratings(bad_ts)


def test_bad_scale_argument(tmp_path) -> None:
    path = _write(tmp_path / "u.data", "1\t2\t3\t4\n")
    with pytest.raises(DataError, match="low < high"):
        read_ratings(path, scale=(5, 1))


# ---------------------------------------------------------------- duplicates
def test_duplicates_keep_latest_then_last_and_are_logged(tmp_path, caplog) -> None:
    path = _write(tmp_path / "r.csv", "user,item,rating,timestamp\n"
                                      "1,1,1,300\n"    # latest of (1,1): kept
                                      "1,1,2,100\n"
                                      "2,5,3,50\n"
                                      "1,2,4,10\n"     # tie on (1,2): the later line wins
                                      "1,2,5,10\n"
                                      "1,1,3,200\n")
    with caplog.at_level(logging.WARNING, logger="tabrec.ingest"):
        df = read_ratings(path)
    assert list(zip(df["user"], df["item"], df["rating"], strict=True)) == [
        ("1", "1", 1.0), ("2", "5", 3.0), ("1", "2", 5.0)]           # file order kept
    assert df.attrs["duplicates_dropped"] == 3
    records = [r for r in caplog.records if r.name == "tabrec.ingest"]
    assert len(records) == 1 and "dropped 3 duplicate" in records[0].getMessage()
    assert "r.csv" in records[0].getMessage()


def test_no_duplicates_no_log(tmp_path, caplog) -> None:
    path = _write(tmp_path / "u.data", "1\t1\t3\t1\n1\t2\t3\t1\n2\t1\t3\t1\n")
    with caplog.at_level(logging.WARNING, logger="tabrec.ingest"):
        df = read_ratings(path)
    assert len(df) == 3 and not caplog.records


# ---------------------------------------------------------------- items
def test_items_u_item_latin1(tmp_path) -> None:
    flags = ["0"] * 19
    action, comedy = flags.copy(), flags.copy()
    action[1] = "1"
    comedy[5], comedy[8] = "1", "1"
    text = (f"1|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(action)}\n"
            f"2|Café Noir (1993)|||http://y|{'|'.join(comedy)}\n")
    path = _write(tmp_path / "u.item", text, encoding="latin-1")
    items = read_items(path)
    assert items["item"].tolist() == ["1", "2"]
    assert items["title"].tolist() == ["Toy Story (1995)", "Café Noir (1993)"]
    assert items["year"].tolist() == [1995, 1993]            # release date, else title
    assert items["genres"].tolist() == ["Action", "Comedy|Drama"]


def test_items_movies_dat_and_ml_latest_csv(tmp_path) -> None:
    dat = _write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation|Comedy\n"
                                          "2::Amélie: Le Fabuleux (2001)::Romance\n",
                 encoding="latin-1")
    items = read_items(dat)
    assert items["title"].tolist()[1] == "Amélie: Le Fabuleux (2001)"
    assert items["year"].tolist() == [1995, 2001]
    assert items["genres"].tolist() == ["Animation|Comedy", "Romance"]

    csv = _write(tmp_path / "movies.csv", 'movieId,title,genres\n1,"Heat, The (1995)",Action\n'
                                          "2,Untitled,(no genres listed)\n", newline="\r\n")
    items = read_items(csv)
    assert items["title"].tolist() == ["Heat, The (1995)", "Untitled"]
    assert items["year"].isna().tolist() == [False, True]
    assert str(items["year"].dtype) == "Int64"


def test_items_bad_files(tmp_path) -> None:
    no_title = _write(tmp_path / "m.csv", "movieId,name2\n1,x\n")
    with pytest.raises(DataError, match=r"m\.csv: items file needs"):
        read_items(no_title)
    missing_id = _write(tmp_path / "n.csv", "movieId,title\n1,a\n,b\n")
    with pytest.raises(DataError, match=r"n\.csv: column 'item'.*line 3"):
        read_items(missing_id)
    with pytest.raises(DataError, match="empty"):
        read_items(_write(tmp_path / "e.csv", "\n\n"))


# ---------------------------------------------------------------- real files
@needs_shared
def test_real_ml100k_files() -> None:
    full = read_ratings(SHARED / "u.data")
    assert len(full) == 100_000 and full.attrs["format"] == "ml-100k"
    assert full["user"].nunique() == 943 and full["item"].nunique() == 1682
    assert rating_scale(full) == (1.0, 5.0) and full.attrs["duplicates_dropped"] == 0
    train, valid = read_ratings(SHARED / "train.tsv"), read_ratings(SHARED / "valid.tsv")
    assert (len(train), len(valid)) == (80_000, 20_000)
    both = pd.concat([train, valid])
    assert not both.duplicated(["user", "item"]).any()
    items = read_items(SHARED / "movies.csv")
    assert len(items) == 1682 and set(full["item"]) <= set(items["item"])
    assert {"title", "year", "genres"} <= set(items.columns)


def test_na_strings_are_ids_not_missing(tmp_path) -> None:
    path = _write(tmp_path / "r.csv", "user,item,rating\nNA,i1,3\nu2,NA,4\n")
    df = read_ratings(path)
    assert df["user"].tolist() == ["NA", "u2"] and df["item"].tolist() == ["i1", "NA"]


def test_reads_the_synthetic_demo_files(tmp_path) -> None:
    from pipelines.synth import write_ratings

    paths = write_ratings(tmp_path, users=40, items=50, ratings=600, seed=1)
    df = read_ratings(paths["u.data"])
    assert df.attrs["format"] == "ml-100k" and len(df) == 600
    assert rating_scale(df) == (1.0, 5.0)
    items = read_items(paths["movies.csv"])
    assert len(items) == 50 and set(df["item"]) <= set(items["item"])
    assert items["year"].notna().all() and items["genres"].str.len().gt(0).all()
